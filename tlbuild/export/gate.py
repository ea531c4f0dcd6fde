"""The accuracy gate: every precision variant against FP32 on the validation split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tlbuild.artifacts import OnnxArtifact
from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.data.scan import Sample
from tlbuild.export.compare import compare_artifacts
from tlbuild.manifest import Variant
from tlbuild.runtime.backends import open_onnx
from tlbuild.runtime.providers import CPU, Placement


def evaluate_variants(
    folder: Path,
    variants: Sequence[OnnxArtifact],
    samples: Sequence[Sample],
    spec: Preprocessing,
    batch: int = 32,
    files: Mapping[str, Path] | None = None,
    on: Placement = CPU,
) -> dict[str, Variant]:
    """Stream the validation images once through FP32 and every variant in `folder`.

    `files`: where a variant's file is, when not yet under its name in `folder` (a candidate
    that is published only once it passes). Images are decoded batch by batch, so memory
    stays flat however large the split. `on`: where they run (int8_cpu on the CPU always).
    """
    files = files or {}
    fp32 = open_onnx(folder / "model.onnx", on=on)
    candidates = {
        a.variant: open_onnx(
            files.get(a.variant, folder / a.file),
            simulate_qdq=a.simulate_qdq,
            on=on.for_artifact(a),
        )
        for a in variants
    }
    batches = (
        load_batch([s.path for s in samples[i : i + batch]], spec)
        for i in range(0, len(samples), batch)
    )
    labels = np.array([s.label for s in samples])
    figures = compare_artifacts(fp32, candidates, batches, labels)
    results: dict[str, Variant] = {}
    for a in variants:
        c = figures[a.variant]
        results[a.variant] = Variant(
            variant=a.variant,
            file=a.file,
            precision=a.precision,
            accuracy=c["accuracy"],
            fp32_accuracy=c["fp32_accuracy"],
            drop_points=c["drop_points"],
            top1_agreement=c["top1_agreement"],
            max_abs_logit_diff=c["max_abs_logit_diff"],
            images=c["images"],
            answers_changed=c["answers_changed"],
            drop_upper_points=c["drop_upper_points"],
            evaluated_with=on.for_artifact(a).label
            + (", Q/DQ simulated (optimizations off)" if a.simulate_qdq else ", optimized kernels")
            + (f"; FP32 on {on.label}" if on.for_artifact(a) != on else ""),
        )
    return results
