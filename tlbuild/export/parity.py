"""Check an exported ONNX model against PyTorch on real validation images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, preprocess


@dataclass
class ParityResult:
    """How closely ONNX Runtime reproduces PyTorch on the same preprocessed images."""

    images: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    atol: float
    min_top1_agreement: float
    provider: str

    @property
    def passed(self) -> bool:
        """Within tolerance on both counts."""
        return (
            self.max_abs_logit_diff <= self.atol and self.top1_agreement >= self.min_top1_agreement
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the verdict."""
        return {**asdict(self), "passed": self.passed}


def load_batch(paths: Sequence[Path], spec: Preprocessing) -> np.ndarray:
    """Decode and preprocess images into one NCHW float32 batch."""
    return np.stack([preprocess(load_rgb(p), spec) for p in paths])


def ort_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    images: np.ndarray,
    atol: float,
    min_top1_agreement: float,
    batch_size: int = 16,
) -> ParityResult:
    """Run both on `images` (NCHW float32) and compare logits and top-1 classes."""
    model = model.eval().to("cpu")
    sess = ort_session(onnx_path)
    name = sess.get_inputs()[0].name
    ref, got = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            ref.append(model(torch.from_numpy(x)).numpy())
            got.append(sess.run(None, {name: x})[0])
    r, g = np.concatenate(ref), np.concatenate(got)
    diff = np.abs(r - g)
    return ParityResult(
        images=len(images),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        top1_agreement=float((r.argmax(1) == g.argmax(1)).mean()),
        atol=atol,
        min_top1_agreement=min_top1_agreement,
        provider=sess.get_providers()[0],
    )
