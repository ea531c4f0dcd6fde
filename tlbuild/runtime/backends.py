"""Predictor implementations: PyTorch checkpoint, ONNX Runtime, TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import UsageError
from tlbuild.runtime.base import Predictor

# Short names a user passes, and the ONNX Runtime provider each one means.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class TorchPredictor(Predictor):
    """The fine-tuned model.pt, on CPU or CUDA."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch

        from tlbuild.export.checkpoint import load_trained

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
    ) -> None:
        import onnxruntime as ort

        super().__init__(path, classes, spec, precision)
        if provider not in ORT_PROVIDERS:
            raise UsageError(
                f"unknown provider '{provider}'; use one of {', '.join(ORT_PROVIDERS)}"
            )
        wanted = ORT_PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise UsageError(
                f"{wanted} is not available in this onnxruntime build "
                f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu for "
                "CUDA/TensorRT, or use provider 'cpu'"
            )
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if not spinning:
            # Idle ORT threads otherwise busy-wait, taking cores from work that overlaps
            # inference (decoding in `tlbuild classify`).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = (
            [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
        )
        self._session = ort.InferenceSession(str(path), so, providers=providers)
        # ORT silently falls back to CPU when a GPU provider fails to initialise; say so instead.
        active = self._session.get_providers()[0]
        if active != wanted:
            raise UsageError(f"{wanted} did not initialise for {path.name} (active: {active})")
        self._input = self._session.get_inputs()[0].name

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self._session.get_providers()[0]}"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0].astype(np.float32)


class TensorRTPredictor(Predictor):
    """A serialized TensorRT engine (built for this GPU and TensorRT version)."""

    def __init__(self, path: Path, classes: list[str], spec: Preprocessing, precision: str) -> None:
        from tlbuild.export.tensorrt_build import TensorRTPredictorCore, tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            raise UsageError(f"cannot run {path.name}: {why}")
        super().__init__(path, classes, spec, precision)
        self._core = TensorRTPredictorCore(path)

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
