"""The accuracy gate: every precision variant against FP32 on the validation split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample
from tlbuild.export.parity import load_batch


@dataclass
class VariantResult:
    """How one variant did on the validation split, and whether it ships."""

    variant: str
    file: str
    precision: str
    accuracy: float
    fp32_accuracy: float
    drop_points: float
    top1_agreement: float
    max_abs_logit_diff: float
    evaluated_with: str
    status: str = "accepted"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def variant_session(path: Path, simulate_qdq: bool) -> ort.InferenceSession:
    """A CPU session; with `simulate_qdq`, Q/DQ run as written instead of as int8 kernels.

    With graph optimizations off, ONNX Runtime executes every QuantizeLinear and
    DequantizeLinear node by the ONNX definition (scale, round half to even, saturate) and the
    float op between them: that is the arithmetic TensorRT's explicit quantization promises
    (int8 products summed exactly, rescaled by the same scales), not the CPU's own fused
    U8S8 kernels with their 16-bit intermediate saturation. tests/test_quantize.py checks this
    session against a NumPy implementation of the ONNX Q/DQ definition.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if simulate_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def evaluate_variants(
    fp32_path: Path,
    variants: dict[str, tuple[Path, bool]],
    samples: Sequence[Sample],
    spec: Preprocessing,
    batch: int = 32,
) -> tuple[float, dict[str, VariantResult]]:
    """Stream the validation images once through FP32 and every variant; return their results.

    `variants` maps a name to (file, simulate_qdq). Images are decoded batch by batch, so
    memory stays flat however large the split.
    """
    sessions = {"fp32": variant_session(fp32_path, False)}
    sessions.update({k: variant_session(p, sim) for k, (p, sim) in variants.items()})
    name = sessions["fp32"].get_inputs()[0].name
    labels = np.array([s.label for s in samples])
    logits: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    for i in range(0, len(samples), batch):
        x = load_batch([s.path for s in samples[i : i + batch]], spec)
        for k, sess in sessions.items():
            logits[k].append(sess.run(None, {name: x})[0].astype(np.float32))
    ref = np.concatenate(logits["fp32"])
    fp32_acc = float((ref.argmax(1) == labels).mean())
    results: dict[str, VariantResult] = {}
    for k, (path, sim) in variants.items():
        got = np.concatenate(logits[k])
        acc = float((got.argmax(1) == labels).mean())
        results[k] = VariantResult(
            variant=k,
            file=path.name,
            precision="fp16" if k == "fp16" else "int8",
            accuracy=acc,
            fp32_accuracy=fp32_acc,
            drop_points=round((fp32_acc - acc) * 100, 4),
            top1_agreement=float((got.argmax(1) == ref.argmax(1)).mean()),
            max_abs_logit_diff=float(np.abs(got - ref).max()),
            evaluated_with="onnxruntime CPU, Q/DQ simulated (optimizations off)"
            if sim
            else "onnxruntime CPU, optimized kernels",
        )
    return fp32_acc, results
