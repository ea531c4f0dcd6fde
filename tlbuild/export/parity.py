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
    # The features output's largest difference over its largest magnitude (None: no features).
    features_max_rel_diff: float | None = None

    @property
    def passed(self) -> bool:
        """Within tolerance on every count."""
        features_ok = self.features_max_rel_diff is None or self.features_max_rel_diff <= self.atol
        return (
            self.max_abs_logit_diff <= self.atol
            and self.top1_agreement >= self.min_top1_agreement
            and features_ok
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
    torch_model = TorchPredictor.from_module(model)
    c = compare_artifacts(torch_model, {"onnx": onnx}, batches_of(images, batch_size))["onnx"]
    worst, scale = None, 0.0
    for x in batches_of(images, batch_size):
        _, want = torch_model.logits_and_features(x)
        _, got = onnx.logits_and_features(x)
        if want is None or got is None:
            break
        worst = max(worst or 0.0, float(np.abs(want - got).max()))
        scale = max(scale, float(np.abs(want).max()))
    return ParityResult(
        images=c["images"],
        max_abs_logit_diff=c["max_abs_logit_diff"],
        mean_abs_logit_diff=c["mean_abs_logit_diff"],
        top1_agreement=c["top1_agreement"],
        atol=atol,
        min_top1_agreement=min_top1_agreement,
        provider=onnx.active_provider,
        features_max_rel_diff=None if worst is None else worst / max(scale, 1e-12),
    )
