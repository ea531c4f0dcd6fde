"""Decode any image file into an upright 8-bit RGB PIL image, or say clearly why not."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlbuild.errors import DataError

# Pillow's own default (about 89 Mpx) raises for larger images, which is what we want:
# a production folder must not be able to exhaust memory with one crafted file.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageReadError(DataError):
    """A file that cannot be used as an image; `reason` is short and human-readable."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # convert("L") clips 16/32-bit values at 255 (a white image); scale the range instead.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode in ("I", "F") and arr.max() <= 255 and arr.min() >= 0:
            hi = 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels carry arbitrary colours; composite on white, the usual
        # background of product shots, so the same file always gives the same pixels.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: Path | str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open `path`, apply its EXIF orientation and return RGB; raise ImageReadError if unusable.

    `draft_size` lets JPEG decode at a reduced scale (never below that size); used only to check
    files quickly, not for pixels the model sees.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageReadError(path, f"image too large ({img.width}x{img.height})")
                if draft_size is not None:
                    img.draft("RGB", draft_size)
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
                rgb.load()
                return rgb
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        raise ImageReadError(path, "empty file" if size == 0 else "not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, "image too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Truncated and corrupt files surface as OSError ("image file is truncated", ...).
        raise ImageReadError(path, f"cannot decode: {e}") from None
