"""Decode any image file into an upright 8-bit RGB PIL image, or say clearly why not."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlbuild.errors import DataError
from tlbuild.fileio import NotRegularFileError, open_regular

# Pillow's own default (about 89 Mpx) raises for larger images, which is what we want:
# a production folder must not be able to exhaust memory with one crafted file.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# decode() refuses images over MAX_PIXELS itself, so Pillow's warning for them is noise. Set once
# here: warnings.catch_warnings() per call is not thread-safe, and decoding runs in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Damaged EXIF or TIFF tags are common in camera files and do not stop a decode (the tag is
# dropped); Pillow's UserWarning for each would reach the terminal once per file and place.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
warnings.filterwarnings(
    "ignore", message="Possibly corrupt EXIF", category=UserWarning, module=r"PIL\."
)


class ImageReadError(DataError):
    """A file that cannot be used as an image; `reason` is short and human-readable."""

    def __init__(self, path: Path | str, reason: str) -> None:
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


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = (5, 6, 7, 8)


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image and the full-resolution size of the file (before any draft scaling)."""

    image: Image.Image
    width: int
    height: int


def decode(
    path: Path | str,
    min_size: Callable[[int, int], tuple[int, int]] | None = None,
    data: bytes | None = None,
) -> Decoded:
    """Open `path`, apply its EXIF orientation and return RGB; raise ImageReadError if unusable.

    `min_size(width, height)` (upright, full resolution) lets a JPEG decode at a reduced DCT
    scale that is never smaller than the size it returns: the fast path for big photos.
    `data`, when given, is the file's bytes (read from object storage); `path` then only names it.
    """
    path = Path(path) if data is None else path
    try:
        # Only a regular file is opened: a named pipe among the images would block forever.
        source = open_regular(path) if data is None else io.BytesIO(data)
        with source, Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageReadError(path, f"image too large ({img.width}x{img.height})")
            orientation = img.getexif().get(0x0112, 1)
            swap = orientation in _SWAPS_AXES
            width, height = (img.height, img.width) if swap else img.size
            if min_size is not None and img.format == "JPEG":
                w, h = min_size(width, height)
                # draft() works in stored orientation and never goes below the request.
                img.draft("RGB", (h, w) if swap else (w, h))
            img.load()
            if orientation not in (None, 1):  # transposing is a full copy: skip if upright
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.load()
            return Decoded(rgb, width, height)
    except ImageReadError:
        raise
    except NotRegularFileError as e:
        raise ImageReadError(path, e.reason) from None
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except UnidentifiedImageError:
        size = len(data) if data is not None else (path.stat().st_size if path.exists() else 0)
        reason = "empty file" if size == 0 else "not an image, or a format Pillow cannot read"
        raise ImageReadError(path, reason) from None
    except Image.DecompressionBombError:
        raise ImageReadError(path, "image too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Truncated and corrupt files surface as OSError ("image file is truncated", ...).
        raise ImageReadError(path, f"cannot decode: {e}") from None


def load_rgb(path: Path | str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open `path` as an upright RGB image; raise ImageReadError if unusable.

    `draft_size` lets JPEG decode at a reduced scale (never below that size); used only to check
    files quickly, not for pixels the model sees.
    """
    return decode(path, None if draft_size is None else lambda w, h: draft_size).image
