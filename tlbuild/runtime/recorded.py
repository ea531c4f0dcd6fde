"""Logits computed elsewhere, served as a Predictor: device_batch.npz's FP32 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlbuild.errors import UsageError
from tlbuild.runtime.base import Predictor


class RecordedPredictor(Predictor):
    """The logits recorded for `images`, served only when a call brings the next rows of those
    images (a check walking them batch by batch); after the last row it starts over."""

    def __init__(
        self, images: np.ndarray, logits: np.ndarray, name: str = "recorded logits"
    ) -> None:
        if len(images) != len(logits):
            raise UsageError(f"{name}: {len(images)} images but {len(logits)} rows of logits")
        super().__init__(Path(name))
        self._images, self._logits, self._next = images, logits, 0

    @property
    def backend(self) -> str:
        return "recorded"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        start, end = self._next, self._next + len(batch)
        if not np.array_equal(batch, self._images[start:end]):
            raise UsageError(
                f"{self.artifact.name}: the batch of {len(batch)} is not recorded images "
                f"{start}..{end - 1}; these logits are only for the images they were recorded on"
            )
        self._next = 0 if end == len(self._images) else end
        return self._logits[start:end]
