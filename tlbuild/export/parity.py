"""Check an exported ONNX model against PyTorch on real validation images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tlbuild.export.compare import batches_of, compare_artifacts
from tlbuild.runtime.backends import open_onnx
from tlbuild.runtime.torch_model import TorchPredictor


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


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    images: np.ndarray,
    atol: float,
    min_top1_agreement: float,
    batch_size: int = 16,
) -> ParityResult:
    """Run both on `images` (NCHW float32) and compare logits and top-1 classes."""
    onnx = open_onnx(onnx_path)
    c = compare_artifacts(
        TorchPredictor.from_module(model), {"onnx": onnx}, batches_of(images, batch_size)
    )["onnx"]
    return ParityResult(
        images=c["images"],
        max_abs_logit_diff=c["max_abs_logit_diff"],
        mean_abs_logit_diff=c["mean_abs_logit_diff"],
        top1_agreement=c["top1_agreement"],
        atol=atol,
        min_top1_agreement=min_top1_agreement,
        provider=onnx.active_provider,
    )
