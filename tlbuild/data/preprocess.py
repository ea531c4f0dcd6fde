"""The one preprocessing definition shared by training eval, export checks and inference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from tlbuild.data.images import decode, load_rgb

# Far above any recipe's input size (recipes allow 32..2048): the bound a manifest is held to.
MAX_INPUT_SIDE = 4096

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded RGB image becomes the model's input tensor; recorded in the manifest."""

    input_size: tuple[int, int]  # (height, width)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"]
    mean: tuple[float, float, float]  # on 0..1 pixel values
    std: tuple[float, float, float]
    resize: Literal["center_crop", "resize"]
    crop_pct: float
    layout: str = "NCHW"
    channel_order: str = "RGB"
    pixel_scale: float = 1.0 / 255.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form for the manifest."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # What happens before resizing, and which resize, so a consumer can match it exactly.
        d["decode"] = {
            "exif_orientation": "applied",
            "alpha": "composited on white",
            "high_bit_depth": "16-bit scaled to 8-bit (value / 257)",
            "resize_impl": "Pillow Image.resize (antialiased when downscaling)",
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of to_dict; a ValueError saying what a damaged record gets wrong.

        The record comes from a manifest, which may have been edited or damaged: every size
        and factor is bounded here, so none can make a reader allocate without limit."""
        try:
            spec = cls(
                input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
                interpolation=str(d["interpolation"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                resize=str(d["resize"]),  # type: ignore[arg-type]
                crop_pct=float(d["crop_pct"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"incomplete or mistyped ({type(e).__name__}: {e})") from None
        problems = [
            why
            for bad, why in (
                (
                    len(spec.input_size) != 2
                    or not all(1 <= v <= MAX_INPUT_SIDE for v in spec.input_size),
                    f"input_size must be two sides of 1..{MAX_INPUT_SIDE} pixels",
                ),
                (spec.interpolation not in _RESAMPLE, "unknown interpolation"),
                (spec.resize not in ("center_crop", "resize"), "unknown resize"),
                (not 0.0 < spec.crop_pct <= 1.0, "crop_pct must be in (0, 1]"),
                (
                    len(spec.mean) != 3
                    or len(spec.std) != 3
                    or not all(math.isfinite(v) for v in spec.mean + spec.std)
                    or min(spec.std) <= 0.0,
                    "mean and std must be 3 finite values each, std above 0",
                ),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return spec

    @property
    def resample(self) -> Image.Resampling:
        """The PIL resampling filter for `interpolation`."""
        return _RESAMPLE[self.interpolation]


def resized_size(width: int, height: int, spec: Preprocessing) -> tuple[int, int]:
    """(w, h) an image of this size is resized to before the centre crop (if any)."""
    h, w = spec.input_size
    if spec.resize == "resize":
        return w, h
    # Scale so the image covers (h, w) / crop_pct, then cut the centre: timm's eval transform.
    scale = max(h / spec.crop_pct / height, w / spec.crop_pct / width)
    return max(w, math.floor(width * scale + 0.5)), max(h, math.floor(height * scale + 0.5))


def resize_for_model(
    img: Image.Image, spec: Preprocessing, full_size: tuple[int, int] | None = None
) -> Image.Image:
    """Resize (and centre-crop, per the policy) an RGB image to exactly the input size.

    `full_size` is the file's real (w, h) when `img` was decoded at a reduced scale, so the
    geometry is the same as for a full decode.
    """
    h, w = spec.input_size
    new_w, new_h = resized_size(*(full_size or img.size), spec)
    img = img.resize((new_w, new_h), spec.resample)
    if spec.resize == "resize":
        return img
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return img.crop((left, top, left + w, top + h))


def normalize(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image of the input size -> float32 CHW array, scaled and normalised."""
    # One fused multiply-add straight from uint8 HWC into CHW: (x * scale - mean) / std.
    std = np.asarray(spec.std, np.float32)
    a = (np.float32(spec.pixel_scale) / std).reshape(3, 1, 1)
    b = (-np.asarray(spec.mean, np.float32) / std).reshape(3, 1, 1)
    chw = np.asarray(img).transpose(2, 0, 1)
    out = np.empty(chw.shape, np.float32)
    np.multiply(chw, a, out=out)
    out += b
    return out


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """The full inference preprocessing of one decoded RGB image (CHW float32)."""
    return normalize(resize_for_model(img, spec), spec)


@dataclass(frozen=True)
class ModelInput:
    """One file ready for the model: CHW float32 `array` and the file's full (width, height)."""

    array: np.ndarray
    width: int
    height: int


# A JPEG may decode at a reduced DCT scale only while it stays this much larger than the
# resize target, so Pillow's anti-aliased resize still does most of the filtering. Measured on
# photographs and the demo surfaces: 1.0 drifts by up to 1.4 grey levels on average and 12 at
# the 99th percentile; 1.5 by at most 0.7 and 6; 2.0 gives up the speed-up for 640x480 -> 160.
DRAFT_OVERSAMPLE = 1.5


def load_input(
    path: Path | str, spec: Preprocessing, exact: bool = False, data: bytes | None = None
) -> ModelInput:
    """Decode a file and apply the inference preprocessing; ImageReadError if unusable.

    By default a JPEG much larger than needed decodes at a reduced DCT scale (libjpeg's draft
    mode: 640x480 -> 160 px decodes at 320x240, about 1.5x faster), within 1 grey level on
    average and 6 at the 99th percentile of the full decode (tests/test_classify.py).
    `exact=True` decodes fully: bit-identical to the training evaluation. `data`: the file's
    bytes when they were read elsewhere (object storage).
    """

    def min_size(w: int, h: int) -> tuple[int, int]:
        rw, rh = resized_size(w, h, spec)
        return math.ceil(rw * DRAFT_OVERSAMPLE), math.ceil(rh * DRAFT_OVERSAMPLE)

    d = decode(path, None if exact else min_size, data)
    x = normalize(resize_for_model(d.image, spec, (d.width, d.height)), spec)
    return ModelInput(x, d.width, d.height)


def load_batch(paths: Sequence[Path], spec: Preprocessing) -> np.ndarray:
    """Decode and preprocess image files into one NCHW float32 batch."""
    return np.stack([preprocess(load_rgb(p), spec) for p in paths])
