"""Predictor implementations: PyTorch checkpoint, ONNX Runtime, TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import UsageError
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.sessions import ort_session


class TorchPredictor(Predictor):
    """The fine-tuned model.pt, on CPU or CUDA."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch

        from tlbuild.models.checkpoint import load_trained

        tm = load_trained(path)
        super().__init__(path, tm.classes, tm.preprocessing, "fp32")
        self._torch = torch
        self._device = torch.device(device)
        self._model = tm.model.eval().to(self._device)

    @property
    def backend(self) -> str:
        return f"torch:{self._device}"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(batch).to(self._device)
            return self._model(x).float().cpu().numpy()


class OnnxPredictor(Predictor):
    """An ONNX artifact in ONNX Runtime with the requested execution provider, verified active."""

    def __init__(
        self,
        path: Path,
        classes: list[str],
        spec: Preprocessing,
        precision: str,
        provider: str = "cpu",
        threads: int | None = None,
        spinning: bool = True,
        tensorrt: dict[str, str] | None = None,
    ) -> None:
        super().__init__(path, classes, spec, precision)
        self._session = ort_session(path, provider, threads, spinning, tensorrt=tensorrt)
        self._input = self._session.get_inputs()[0].name
        width = self._session.get_outputs()[0].shape[-1]
        # The manifest's classes name the outputs: a model of another width (a swapped file
        # and a manifest that vouches for it) would fail mid-run or label every row wrongly.
        if isinstance(width, int) and width != len(classes):
            raise UsageError(
                f"{path.name} outputs {width} scores but its manifest names {len(classes)} "
                "classes; copy the export folder again"
            )

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self._session.get_providers()[0]}"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0].astype(np.float32)


class TensorRTPredictor(Predictor):
    """A serialized TensorRT engine (built for this GPU and TensorRT version)."""

    def __init__(self, path: Path, classes: list[str], spec: Preprocessing, precision: str) -> None:
        from tlbuild.runtime.tensorrt import TensorRTEngine, tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            raise UsageError(f"cannot run {path.name}: {why}")
        super().__init__(path, classes, spec, precision)
        self._core = TensorRTEngine(path)

    @property
    def backend(self) -> str:
        return "tensorrt"

    def supports_batch(self, n: int) -> bool:
        return self._core.min_batch <= n <= self._core.max_batch

    def logits(self, batch: np.ndarray) -> np.ndarray:
        # Any batch size works: split above the engine's profile, pad below it (then trim),
        # so classify's last, partial batch never fails.
        core, outs = self._core, []
        for i in range(0, len(batch), core.max_batch):
            part = batch[i : i + core.max_batch]
            n = len(part)
            if n < core.min_batch:
                part = np.concatenate([part, np.repeat(part[-1:], core.min_batch - n, axis=0)])
            outs.append(core.run(part)[:n])
        return np.concatenate(outs)
