"""Predictors over exported files: ONNX Runtime (open_onnx for checks) and TensorRT engines.
No PyTorch (torch_model.py): stages that run only exported files stay keyed off training code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlbuild.artifacts import precision_of
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import UsageError
from tlbuild.export.feature_graph import FEATURES_NAME
from tlbuild.runtime.base import Predictor, softmax
from tlbuild.runtime.providers import CPU, Placement
from tlbuild.runtime.sessions import OrtOptions, ort_session

if TYPE_CHECKING:
    from tlbuild.runtime.tensorrt import TensorRTEngine


class OnnxPredictor(Predictor):
    """An ONNX artifact in ONNX Runtime with the requested execution provider, verified active.

    `options` are ort_session's (provider, threads, Q/DQ simulation, profiling). With `classes`,
    the model's output width must match them.
    """

    def __init__(
        self,
        path: Path,
        classes: list[str] | None = None,
        spec: Preprocessing | None = None,
        precision: str | None = None,
        options: OrtOptions | None = None,
    ) -> None:
        super().__init__(path, classes, spec, precision)
        o = options or OrtOptions()
        self.options = o
        self._session = ort_session(path, o)
        self._input = self._session.get_inputs()[0].name
        names = [o.name for o in self._session.get_outputs()]
        self._logits_name = names[0]
        self._features_name = FEATURES_NAME if FEATURES_NAME in names[1:] else None
        width = self._session.get_outputs()[0].shape[-1]
        # The manifest's classes name the outputs: a model of another width (a swapped file
        # and a manifest that vouches for it) would fail mid-run or label every row wrongly.
        if classes is not None and isinstance(width, int) and width != len(classes):
            raise UsageError(
                f"{path.name} outputs {width} scores but its manifest names {len(classes)} "
                "classes; copy the export folder again"
            )

    @property
    def active_provider(self) -> str:
        """The ONNX Runtime execution provider running it, e.g. 'CPUExecutionProvider'."""
        return str(self._session.get_providers()[0])

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self.active_provider}"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run([self._logits_name], {self._input: batch})[0]
        return out.astype(np.float32)

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._features_name is None:
            return self.logits(batch), None
        logits, features = self._session.run(
            [self._logits_name, self._features_name], {self._input: batch}
        )
        return logits.astype(np.float32), features.astype(np.float32)

    def outputs(self, batch: np.ndarray) -> dict[str, Any]:
        """Every graph output by name, as ONNX Runtime returns it (the INT8 search's probes)."""
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(None, {self._input: batch}), strict=True))

    def end_profiling(self) -> Path:
        """Stop ONNX Runtime's profiler (options.profile_prefix) and return its JSON file."""
        if not self.options.profile_prefix:
            raise UsageError(f"{self.artifact.name} was opened without profile_prefix")
        return Path(self._session.end_profiling())


class ImageOnnxPredictor(OnnxPredictor):
    """A model_image twin: decoded uint8 RGB images in (N, H, W, 3), the resize and normalisation
    in its graph. Images of one size run as one batch; `preprocess` only decodes to pixels."""

    takes_images = True

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """The decoded image's pixels: uint8 HWC RGB at its own size."""
        return np.asarray(img.convert("RGB"))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run([self._logits_name], {self._input: batch.astype(np.uint8)})[0]
        return out.astype(np.float32)

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return super().logits_and_features(batch.astype(np.uint8))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch))

    def predict_paths(self, paths: Sequence[Path], batch_size: int = 32) -> np.ndarray:
        pixels = [self.preprocess(load_rgb(p)) for p in paths]
        logits, _ = images_logits(self, pixels, with_features=False)
        return (
            softmax(logits) if len(pixels) else np.zeros((0, len(self.classes or ())), np.float32)
        )


def images_logits(
    predictor: Predictor, images: Sequence[np.ndarray], with_features: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and features) for decoded images of any sizes, in order: one run per size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    logits: list[np.ndarray | None] = [None] * len(images)
    features: list[np.ndarray | None] = [None] * len(images)
    for idx in groups.values():
        batch = np.stack([images[i] for i in idx])
        if with_features:
            lg, ft = predictor.logits_and_features(batch)
        else:
            lg, ft = predictor.logits(batch), None
        for k, i in enumerate(idx):
            logits[i] = lg[k]
            features[i] = None if ft is None else ft[k]
    if not images:
        return np.zeros((0, 0), np.float32), None
    stacked = np.stack(logits)  # type: ignore[arg-type]
    has = all(f is not None for f in features)
    return stacked, np.stack(features) if has else None  # type: ignore[arg-type]


def open_onnx(
    path: Path,
    simulate_qdq: bool = False,
    threads: int | None = None,
    profile_prefix: str | None = None,
    on: Placement = CPU,
) -> OnnxPredictor:
    """`path` on ONNX Runtime's CPU provider (or `on` a GPU), for logits only: no manifest, no
    class names.

    The gates, parity, the INT8 search and bench's timer check open files this way; with
    `simulate_qdq` every Q/DQ node runs as written (ort_session explains why).
    """
    options = OrtOptions(
        provider=on.provider,
        device_id=on.device_id,
        threads=threads,
        simulate_qdq=simulate_qdq,
        profile_prefix=profile_prefix,
        memory_arena=False,  # checks hold several sessions at once (OrtOptions says why)
    )
    return OnnxPredictor(Path(path), options=options)


class TensorRTPredictor(Predictor):
    """A serialized TensorRT engine (built for this GPU and TensorRT version)."""

    def __init__(self, path: Path, classes: list[str], spec: Preprocessing, precision: str) -> None:
        from tlbuild.runtime.tensorrt import TensorRTEngine, tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            raise UsageError(f"cannot run {path.name}: {why}")
        super().__init__(path, classes, spec, precision)
        self._core = TensorRTEngine(path)

    @classmethod
    def from_engine(cls, engine: TensorRTEngine) -> TensorRTPredictor:
        """An engine already loaded (the engines stage's gate); precision from its file name."""
        p = cls.__new__(cls)
        Predictor.__init__(p, engine.path, precision=precision_of(engine.path.name))
        p._core = engine
        return p

    @property
    def backend(self) -> str:
        return "tensorrt"

    def supports_batch(self, n: int) -> bool:
        return self._core.min_batch <= n <= self._core.max_batch

    def _run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # Any batch size works: split above the engine's profile, pad below it (then trim),
        # so classify's last, partial batch never fails.
        core, outs = self._core, []
        for i in range(0, len(batch), core.max_batch):
            part = batch[i : i + core.max_batch]
            n = len(part)
            if n < core.min_batch:
                part = np.concatenate([part, np.repeat(part[-1:], core.min_batch - n, axis=0)])
            outs.append({k: v[:n] for k, v in core.run_all(part).items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._run_all(batch)[self._core.output_name]

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._run_all(batch)
        return out[self._core.output_name], out.get(FEATURES_NAME)
