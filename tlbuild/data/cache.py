"""Decode every training and validation image once per run, then augment from memory.

Training images are kept as decoded uint8 RGB arrays. An image larger than augmentation can use
is first shrunk (Pillow's antialiased resize, the training interpolation) so that its short side
is `max_side`: the random resized crop then still samples at least the input size from its
smallest allowed crop, so no detail the model could see is lost. Images at or under that size
(the usual case for inspection crops) are stored as decoded, which makes training from the cache
bit-identical to decoding every epoch (tests/test_cache.py checks both statements).
Validation images are stored after the inference resize, which is exact by construction.

Arrays stay in memory up to `ram_mib`; the rest goes to one memory-mapped file that is deleted
when the run ends.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlbuild.data.decode_threads import DecodeThreads
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, resize_for_model


def train_max_side(spec: Preprocessing, crop_scale_min: float) -> int:
    """The short side past which a training image is shrunk before caching.

    A random resized crop keeps at least `crop_scale_min` of the area, so its side is at least
    sqrt(crop_scale_min) of the image's; the image needs input/sqrt(scale) px for that crop to
    still be sampled at full resolution. Twice that leaves room for the crop's aspect ratios.
    """
    return math.ceil(2 * max(spec.input_size) / math.sqrt(crop_scale_min))


def _shrink(img: Image.Image, max_side: int, spec: Preprocessing) -> Image.Image:
    short = min(img.size)
    if short <= max_side:
        return img
    f = max_side / short
    return img.resize((round(img.width * f), round(img.height * f)), spec.resample)


class ImageCache:
    """uint8 HWC arrays by index, in RAM up to a limit and in a memory-mapped file beyond it."""

    def __init__(self, ram_bytes: int, spill_dir: Path | None = None) -> None:
        self.ram_bytes = ram_bytes
        self.spill_dir = spill_dir
        self._ram: dict[int, np.ndarray] = {}
        self._spilled: dict[int, tuple[int, tuple[int, ...]]] = {}  # offset, shape
        self._file: Path | None = None
        self._handle: Any = None
        self._map: np.memmap | None = None
        self._used = 0
        self._spill_bytes = 0

    def put(self, i: int, arr: np.ndarray) -> None:
        """Store image `i` (called from one thread)."""
        if self._used + arr.nbytes <= self.ram_bytes:
            self._ram[i] = arr
            self._used += arr.nbytes
            return
        if self._handle is None:
            # Named as fileio's temporary files are, with the pid: a killed run's spill file
            # (it can be gigabytes) is removed by the next build.
            fd, name = tempfile.mkstemp(
                prefix=f".tlbuild-cache.{os.getpid()}-", suffix=".tmp.u8", dir=self.spill_dir
            )
            self._file, self._handle = Path(name), os.fdopen(fd, "wb")
        self._handle.write(np.ascontiguousarray(arr).tobytes())
        self._spilled[i] = (self._spill_bytes, arr.shape)
        self._spill_bytes += arr.nbytes

    def seal(self) -> None:
        """Finish writing; spilled arrays become readable."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._open()

    def _open(self) -> None:
        if self._file is not None and self._spill_bytes:
            self._map = np.memmap(self._file, dtype=np.uint8, mode="r", shape=(self._spill_bytes,))

    @property
    def spilled_bytes(self) -> int:
        """Bytes written to the memory-mapped file."""
        return self._spill_bytes

    @property
    def ram_used(self) -> int:
        """Bytes held in memory."""
        return self._used

    def get(self, i: int) -> np.ndarray:
        """Image `i` as a read-only uint8 HWC array."""
        arr = self._ram.get(i)
        if arr is not None:
            return arr
        offset, shape = self._spilled[i]
        assert self._map is not None
        return self._map[offset : offset + int(np.prod(shape))].reshape(shape)

    def close(self) -> None:
        """Delete the spill file."""
        self._map = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn get the file name, not a copy of the mapping.
        state = self.__dict__.copy()
        state["_map"], state["_handle"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()


def fill_cache(
    cache: ImageCache,
    paths: Sequence[Path],
    prepare: Callable[[Image.Image], Image.Image],
    on_done: Callable[[], None] | None = None,
) -> None:
    """Decode `paths` in threads (Pillow releases the GIL) and store prepare(image) in order."""
    workers = min(8, (os.cpu_count() or 2) * 2)

    def load(p: Path) -> np.ndarray:
        return np.asarray(prepare(load_rgb(p)), dtype=np.uint8)

    # On Ctrl-C or a bad file the queued decodes are dropped, and a read that never returns
    # holds one daemon thread, not the process.
    with DecodeThreads(workers, "tlbuild-cache") as pool:
        for k, arr in enumerate(pool.imap(load, paths, 4 * workers)):
            cache.put(k, arr)
            if on_done is not None:
                on_done()


def train_preparer(
    spec: Preprocessing, crop_scale_min: float
) -> Callable[[Image.Image], Image.Image]:
    """What a training image becomes before caching (see the module docstring)."""
    side = train_max_side(spec, crop_scale_min)
    return lambda img: _shrink(img, side, spec)


def eval_preparer(spec: Preprocessing) -> Callable[[Image.Image], Image.Image]:
    """The inference resize (and crop): the cached array needs only normalising."""
    return lambda img: resize_for_model(img, spec)
