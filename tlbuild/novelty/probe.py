"""The build's probe of camera faults: validation images as a failing station would see them.

Each fault is a deterministic function of the image (noise is seeded by the image's index), so
the probe is the same on every run. They are what goes wrong at an inspection station: the
light dies (dark), the exposure runs away (overexposed), the lens drifts out of focus, the
sensor or cable adds noise, something covers half the view, the part sits off-centre.
benchmarks/novelty.py tries further kinds the build does not probe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter


def _scaled(img: Image.Image, gain: float) -> Image.Image:
    a = np.asarray(img, np.float32) * gain
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def dark(img: Image.Image, i: int) -> Image.Image:
    """The light gone: 6% of the exposure."""
    return _scaled(img, 0.06)


def overexposed(img: Image.Image, i: int) -> Image.Image:
    """Four times the exposure, clipped."""
    return _scaled(img, 4.0)


def out_of_focus(img: Image.Image, i: int) -> Image.Image:
    """A Gaussian blur of 4% of the image's longer side."""
    return img.filter(ImageFilter.GaussianBlur(0.04 * max(img.size)))


def noisy(img: Image.Image, i: int) -> Image.Image:
    """Sensor or cable noise: Gaussian, sigma 60 of 255."""
    a = np.asarray(img, np.float32)
    a = a + np.random.default_rng(i).normal(0.0, 60.0, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def half_covered(img: Image.Image, i: int) -> Image.Image:
    """The lower half of the view blocked."""
    a = np.asarray(img).copy()
    a[a.shape[0] // 2 :] = 0
    return Image.fromarray(a)


def off_centre(img: Image.Image, i: int) -> Image.Image:
    """The part half out of the frame: shifted right by half the width, black behind."""
    a = np.asarray(img)
    out = np.zeros_like(a)
    w = a.shape[1]
    out[:, w // 2 :] = a[:, : w - w // 2]
    return Image.fromarray(out)


FAULTS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "dark": dark,
    "overexposed": overexposed,
    "out_of_focus": out_of_focus,
    "noisy": noisy,
    "half_covered": half_covered,
    "off_centre": off_centre,
}
