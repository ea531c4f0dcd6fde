"""The one preprocessing definition shared by training eval, export checks and inference."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

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
        """Inverse of to_dict."""
        return cls(
            input_size=tuple(d["input_size"]),  # type: ignore[arg-type]
            interpolation=d["interpolation"],
            mean=tuple(d["mean"]),  # type: ignore[arg-type]
            std=tuple(d["std"]),  # type: ignore[arg-type]
            resize=d["resize"],
            crop_pct=float(d["crop_pct"]),
        )

    @property
    def resample(self) -> Image.Resampling:
        """The PIL resampling filter for `interpolation`."""
        return _RESAMPLE[self.interpolation]


def resize_for_model(img: Image.Image, spec: Preprocessing) -> Image.Image:
    """Resize (and centre-crop, per the policy) an RGB image to exactly the input size."""
    h, w = spec.input_size
    if spec.resize == "resize":
        return img.resize((w, h), spec.resample)
    # Scale so the image covers (h, w) / crop_pct, then cut the centre: timm's eval transform.
    scale = max(h / spec.crop_pct / img.height, w / spec.crop_pct / img.width)
    new_w = max(w, math.floor(img.width * scale + 0.5))
    new_h = max(h, math.floor(img.height * scale + 0.5))
    img = img.resize((new_w, new_h), spec.resample)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return img.crop((left, top, left + w, top + h))


def normalize(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image of the input size -> float32 CHW array, scaled and normalised."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(spec.pixel_scale)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """The full inference preprocessing of one decoded RGB image (CHW float32)."""
    return normalize(resize_for_model(img, spec), spec)
