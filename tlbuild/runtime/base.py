"""The Predictor interface: the manifest's preprocessing in, class probabilities out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, preprocess
from tlbuild.errors import UsageError


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor(ABC):
    """An artifact ready to classify: same preprocessing, same classes, whatever the backend.

    Classes, preprocessing and precision come from the manifest (load_predictor); a check that
    only compares logits on preprocessed batches opens one without them (open_onnx).
    """

    # Whether it takes decoded images (uint8 RGB NHWC at their own size, the preprocessing in
    # its graph: a model_image twin) instead of preprocessed NCHW float32 batches.
    takes_images = False

    def __init__(
        self,
        artifact: Path,
        classes: list[str] | None = None,
        spec: Preprocessing | None = None,
        precision: str | None = None,
    ) -> None:
        self.artifact = artifact
        self.classes = classes
        self.preprocessing = spec
        self.precision = precision
        self.passed_over: list[str] = []  # provider="auto": candidates that did not start

    @property
    @abstractmethod
    def backend(self) -> str:
        """Where it runs, e.g. 'onnxruntime:CPUExecutionProvider' or 'torch:cpu'."""

    @abstractmethod
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs for an NCHW float32 batch already preprocessed."""

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and the novelty features (export/features.py) for a preprocessed batch;
        None where the artifact has no features output (a model exported before them)."""
        return self.logits(batch), None

    def supports_batch(self, n: int) -> bool:
        """Whether one call at batch size `n` runs natively (TensorRT engines have a range)."""
        return True

    def logits_in_batches(self, images: np.ndarray, batch: int) -> np.ndarray:
        """Logits for preprocessed `images`, `batch` at a time (the batch size each check has
        always used: float results depend on it)."""
        return np.concatenate(
            [
                self.logits(np.ascontiguousarray(images[i : i + batch], dtype=np.float32))
                for i in range(0, len(images), batch)
            ]
        )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for a preprocessed NCHW float32 batch."""
        return softmax(self.logits(np.ascontiguousarray(batch, dtype=np.float32)))

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB image -> CHW float32, exactly as in training evaluation."""
        if self.preprocessing is None:
            raise UsageError(
                f"{self.artifact.name} was opened without its manifest's preprocessing; "
                "open the export folder with load_predictor to classify image files"
            )
        return preprocess(img, self.preprocessing)

    def predict_paths(self, paths: Sequence[Path], batch_size: int = 32) -> np.ndarray:
        """Decode, preprocess and classify image files; probabilities in input order."""
        out = []
        for i in range(0, len(paths), batch_size):
            x = np.stack([self.preprocess(load_rgb(p)) for p in paths[i : i + batch_size]])
            out.append(self.predict(x))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes or ())), np.float32)
