"""Heat-map overlays: the image as the model saw it, a turbo colour map on top, titled tiles."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlbuild.data.preprocess import Preprocessing
from tlbuild.fileio import atomic_path

# Turbo (Google, 2019): jet's reading of "hot = red" without jet's false bands. 0.4 keeps the
# part visible under the map, as pytorch_grad_cam's show_cam_on_image does with its weight.
COLORMAP = "turbo"
ALPHA = 0.4
_WRONG, _RIGHT = "#c62828", "#1b5e20"


@dataclass(frozen=True)
class Tile:
    """One overlay and its caption; `wrong` colours the caption (None: no true label known)."""

    image: np.ndarray  # (H, W, 3) float 0..1
    title: str
    wrong: bool | None = None


def model_view(x: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """A preprocessed CHW input de-normalised back to an HWC 0..1 image: what the model saw."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    rgb = (x * std + mean) / np.float32(spec.pixel_scale * 255.0)
    return np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0)


def blend(image: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """`image` (H, W, 3) with heat map `cam` (H, W, values 0..1) coloured on top."""
    import matplotlib

    heat = matplotlib.colormaps[COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * image + alpha * heat


def tile_title(pred: str, score: float, true: str | None = None, flat: bool = False) -> str:
    """'true: crack / pred: ok 0.91' (without a known true label: 'pred: ok 0.91').

    `flat`: the map singles out no region, which a uniform tint alone would not tell."""
    pred_part = f"pred: {pred} {score:.2f}" + (" / flat map" if flat else "")
    return pred_part if true is None else f"true: {true} / {pred_part}"


def _wrapped(title: str, width: int = 30) -> str:
    # Long class names would run into the next tile: break at the separator.
    return title.replace(" / ", "\n") if len(title) > width else title


def _draw(ax, tile: Tile) -> None:  # noqa: ANN001 - a matplotlib Axes
    ax.imshow(tile.image, interpolation="nearest")
    color = {True: _WRONG, False: _RIGHT}.get(tile.wrong, "black")  # type: ignore[arg-type]
    ax.set_title(_wrapped(tile.title), fontsize=8, color=color)
    ax.set_axis_off()


def save_grid(tiles: Sequence[Tile], path: Path, heading: str, cols: int = 4) -> None:
    """All `tiles` in one PNG, `cols` to a row, under `heading`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    # Constrained layout makes room for the heading and for titles wrapped onto three lines.
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols, 2.9 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, tile in zip(axes.flat, tiles, strict=False):
        _draw(ax, tile)
    # About 12 characters of 9-point text per inch: wrap rather than cut a narrow grid's heading.
    chars = max(24, int(2.4 * cols * 12))
    fig.suptitle("\n".join(textwrap.wrap(heading, chars)), fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def save_tile(tile: Tile, path: Path) -> None:
    """One overlay as its own PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.0, 4.3))
    _draw(ax, tile)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
