"""How big the images are, and an input size that fits them.

Read from file headers only (Pillow opens lazily), on an evenly spaced sample, so it costs
milliseconds even on large folders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tlbuild.fileio import open_regular

SAMPLE = 500
# "auto" makes the input this many times the median short side: small crops are upsampled
# towards the object scale the ImageNet body was trained at, but no further than the backbone's
# own input size (benchmarks/accuracy measures the choice; docs/recipe.md, "Input size").
AUTO_UPSCALE = 3
AUTO_MIN, AUTO_STEP = 64, 32
# Advice is printed when the input is more than this many times the images' short side.
ADVISE_RATIO = 3.0


@dataclass(frozen=True)
class SizeSummary:
    """Median width and height of a sample of images."""

    width: int
    height: int
    sampled: int

    @property
    def short_side(self) -> int:
        """The median image's shorter side."""
        return min(self.width, self.height)


def summarize_sizes(paths: Sequence[Path], sample: int = SAMPLE) -> SizeSummary | None:
    """Median size over up to `sample` evenly spaced files; None if none can be opened."""
    if not paths:
        return None
    step = max(1, len(paths) // sample)
    sizes = []
    for p in list(paths)[::step][:sample]:
        try:
            with open_regular(p) as f, Image.open(f) as im:  # a named pipe must not block
                sizes.append(im.size)
        except Exception:  # unreadable files are reported by the scan, not here
            continue
    if not sizes:
        return None
    w, h = np.median(np.asarray(sizes, dtype=float), axis=0)
    return SizeSummary(int(w), int(h), len(sizes))


def auto_input_size(summary: SizeSummary | None, default: int) -> int:
    """The input side `input_size = "auto"` picks for images of this size."""
    if summary is None:
        return default
    side = math.ceil(AUTO_UPSCALE * summary.short_side / AUTO_STEP) * AUTO_STEP
    return max(AUTO_MIN, min(default, side))


def resolve_input_size(
    requested: int | tuple[int, int] | str | None,
    images: SizeSummary | None,
    default: tuple[int, int],
) -> tuple[int, int]:
    """(h, w) for a recipe's `input_size`: as written, the backbone's `default`, or "auto"'s."""
    size = requested or default
    if size == "auto":
        size = auto_input_size(images, max(default))
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def size_advice(
    summary: SizeSummary | None, input_size: tuple[int, int], default: int
) -> str | None:
    """A one-line note when the input is much larger than the images, else None."""
    if summary is None or max(input_size) <= ADVISE_RATIO * summary.short_side:
        return None
    auto = auto_input_size(summary, default)
    return (
        f"the images are about {summary.width}x{summary.height} px (median of "
        f"{summary.sampled}) but the model input is {input_size[0]}x{input_size[1]}: each image "
        f"is upsampled {max(input_size) / summary.short_side:.1f}x, which costs training and "
        f'inference time. model.preprocess.input_size = "auto" would use {auto} px '
        f"({AUTO_UPSCALE}x the short side)."
    )
