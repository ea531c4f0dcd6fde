"""The PyTorch model as a Predictor: model.pt from an export folder, or a model in memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlbuild.runtime.base import Predictor

if TYPE_CHECKING:
    from torch import nn


class TorchPredictor(Predictor):
    """The fine-tuned model.pt, on CPU or CUDA; or a model in memory (export parity)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        from tlbuild.models.checkpoint import load_trained

        tm = load_trained(path)
        super().__init__(path, tm.classes, tm.preprocessing, "fp32")
        self._place(tm.model, device)

    @classmethod
    def from_module(cls, model: nn.Module, name: str = "PyTorch model") -> TorchPredictor:
        """`model` itself, put in eval mode on the CPU (as parity has always run it)."""
        p = cls.__new__(cls)
        Predictor.__init__(p, Path(name), precision="fp32")
        p._place(model, "cpu")
        return p

    def _place(self, model: nn.Module, device: str) -> None:
        import torch

        self._torch = torch
        self._device = torch.device(device)
        self._model = model.eval().to(self._device)

    @property
    def backend(self) -> str:
        return f"torch:{self._device}"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(batch).to(self._device)
            return self._model(x).float().cpu().numpy()

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        from tlbuild.export.features import WithFeatures, supports_features

        if not supports_features(self._model):
            return self.logits(batch), None
        with self._torch.inference_mode():
            x = self._torch.from_numpy(batch).to(self._device)
            logits, features = WithFeatures(self._model)(x)
            return logits.float().cpu().numpy(), features.float().cpu().numpy()
