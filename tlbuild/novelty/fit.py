"""The build's novelty step: fit the score on the training images, choose its threshold on the
validation split, and measure it on the camera-fault probe and on every shipped variant."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from tlbuild.artifacts import MODEL_ONNX, NOVELTY_NPZ, VARIANTS
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, load_batch, preprocess
from tlbuild.data.scan import Sample
from tlbuild.errors import UsageError
from tlbuild.manifest import Manifest
from tlbuild.novelty.drift import image_block, reference
from tlbuild.novelty.probe import FAULTS
from tlbuild.novelty.score import NoveltyModel, conformal_threshold
from tlbuild.recipe import NoveltyConfig
from tlbuild.runtime.backends import open_onnx
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.providers import CPU, Placement

BATCH = 32
# Below this a threshold is one image's score, and the blocks' spreads are noise.
MIN_VAL_IMAGES = 5


def outputs(
    predictors: Mapping[str, Predictor], batches: Iterable[np.ndarray], progress: Any = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each predictor's logits and features on the same stream of batches (decoded once)."""
    got: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in predictors}
    for x in batches:
        for name, p in predictors.items():
            logits, f = p.logits_and_features(x)
            if f is None:
                raise UsageError(
                    f"{p.artifact.name} has no features output (exported by an older tlbuild); "
                    "rebuild it: `tlbuild run RECIPE --force export`"
                )
            got[name].append((logits, f))
        if progress is not None:
            progress()
    return {
        name: (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
        for name, parts in got.items()
    }


def features(
    predictors: Mapping[str, Predictor], batches: Iterable[np.ndarray], progress: Any = None
) -> dict[str, np.ndarray]:
    """Each predictor's features on the same stream of batches (decoded once)."""
    return {k: f for k, (_, f) in outputs(predictors, batches, progress).items()}


def _file_batches(samples: list[Sample], spec: Preprocessing) -> Iterable[np.ndarray]:
    for i in range(0, len(samples), BATCH):
        yield load_batch([s.path for s in samples[i : i + BATCH]], spec)


def _probe_batches(samples: list[Sample], spec: Preprocessing) -> Iterable[np.ndarray]:
    """Every fault of every probe image, fault by fault."""
    images = [load_rgb(s.path) for s in samples]
    for fault in FAULTS.values():
        made = [preprocess(fault(img, i), spec) for i, img in enumerate(images)]
        for i in range(0, len(made), BATCH):
            yield np.stack(made[i : i + BATCH])


@dataclass
class Inputs:
    """The images the step reads: fit, validation and probe samples."""

    fit: list[Sample]
    val: list[Sample]
    probe: list[Sample]


def shipped_variants(folder: Path, manifest: Manifest, on: Placement = CPU) -> dict[str, Predictor]:
    """FP32 and every accepted ONNX variant, opened as the variant gate opens them."""
    out: dict[str, Predictor] = {MODEL_ONNX: open_onnx(folder / MODEL_ONNX, on=on)}
    for name, v in manifest.variants.items():
        if v.status == "accepted" and (folder / v.file).is_file():
            a = VARIANTS[name]
            out[v.file] = open_onnx(
                folder / v.file, simulate_qdq=a.simulate_qdq, on=on.for_artifact(a)
            )
    return out


def _drift_reference(
    manifest: Manifest,
    val: tuple[np.ndarray, np.ndarray],
    scores: np.ndarray,
    spec: Preprocessing,
) -> dict[str, Any]:
    """The validation images' profile for classify's drift check (tlbuild/novelty/drift.py)."""
    logits, f = val
    labels = [manifest.classes[i] for i in logits.argmax(1)]
    measures: dict[str, np.ndarray] = {"novelty": scores}
    assert manifest.onnx is not None and manifest.onnx.features
    block = image_block(manifest.onnx.features["layout"], spec.mean, spec.std)
    if block is not None:
        measures["brightness"], measures["sharpness"] = block.measures(f)
    return reference(labels, measures, manifest.classes)


def _share(flags: np.ndarray) -> float:
    return round(float(flags.mean()), 4) if len(flags) else 0.0


def fit_novelty(
    folder: Path,
    manifest: Manifest,
    cfg: NoveltyConfig,
    inputs: Inputs,
    progress: Progress | None = None,
    on: Placement = CPU,
) -> tuple[NoveltyModel, dict[str, Any], dict[str, np.ndarray]]:
    """Fit, choose the threshold, measure: the model, the manifest's `novelty` entry, and the
    scores of validation and of each fault (for the plot). `on`: where the models run."""
    assert cfg.target != "off"
    if manifest.onnx is None or not manifest.onnx.features:
        raise UsageError(
            f"{folder / MODEL_ONNX} has no features output (exported by an older tlbuild); "
            "rebuild it: `tlbuild run RECIPE --force export`"
        )
    if len(inputs.val) < MIN_VAL_IMAGES:
        raise UsageError(
            f"the novelty threshold is chosen on the validation split, which has "
            f"{len(inputs.val)} image(s); it needs at least {MIN_VAL_IMAGES}. Add validation "
            'images, or set [novelty] target = "off"'
        )
    spec = Preprocessing.from_dict(manifest.preprocessing)
    layout = manifest.onnx.features["layout"]
    predictors = shipped_variants(folder, manifest, on)
    fp32 = {MODEL_ONNX: predictors[MODEL_ONNX]}
    n_batches = -(-len(inputs.fit) // BATCH) + -(-len(inputs.val) // BATCH)
    n_batches += len(FAULTS) * -(-len(inputs.probe) // BATCH)
    task = progress.add_task("Novelty score", total=n_batches) if progress else None

    def step() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    train_f = features(fp32, _file_batches(inputs.fit, spec), step)[MODEL_ONNX]
    model = NoveltyModel.fit(train_f, layout)
    val_out = outputs(predictors, _file_batches(inputs.val, spec), step)
    val_f = {k: f for k, (_, f) in val_out.items()}
    model.standardise_on(val_f[MODEL_ONNX])
    val_scores = model.scores(val_f[MODEL_ONNX])
    model.threshold, val_flagged = conformal_threshold(val_scores, float(cfg.target))
    drift_ref = _drift_reference(manifest, val_out[MODEL_ONNX], val_scores, spec)
    probe_f = features(predictors, _probe_batches(inputs.probe, spec), step)
    n = len(inputs.probe)
    probe_scores = model.scores(probe_f[MODEL_ONNX])
    by_fault = {
        name: _share(probe_scores[k * n : (k + 1) * n] > model.threshold)
        for k, name in enumerate(FAULTS)
    }
    ref = np.concatenate([val_scores, probe_scores]) > model.threshold
    artifacts = {}
    for name in predictors:
        if name == MODEL_ONNX:
            continue
        mine = np.concatenate([model.scores(val_f[name]), model.scores(probe_f[name])])
        flags = mine > model.threshold
        artifacts[name] = {
            "agreement": round(float((flags == ref).mean()), 4),
            "val_flagged": _share(flags[: len(val_scores)]),
            "faults_flagged": _share(flags[len(val_scores) :]),
            "images": int(len(flags)),
            "met": cfg.min_agreement is None or bool((flags == ref).mean() >= cfg.min_agreement),
        }
    order = np.argsort(-val_scores)
    entry = {
        "file": NOVELTY_NPZ,
        "method": "Gaussians over the image's and the feature maps' statistics and the "
        "pre-logits, their log distances standardised on validation, combined by a smooth "
        "maximum",
        "target": float(cfg.target),
        "threshold": model.threshold,
        "fit_images": len(inputs.fit),
        "evaluated_with": on.label,
        "val": {
            "images": len(val_scores),
            "flagged": val_flagged,
            "scores_p50_p99": [round(float(np.quantile(val_scores, q)), 4) for q in (0.5, 0.99)],
        },
        "probe": {
            "images_per_fault": n,
            "flagged": by_fault,
            "faults_flagged": _share(probe_scores > model.threshold),
        },
        "artifacts": artifacts,
        "most_novel_val": [
            {"path": str(inputs.val[i].path), "score": round(float(val_scores[i]), 3)}
            for i in order[:8]
        ],
        "reference": drift_ref,  # what classify's drift check compares a run with
        "min_agreement": cfg.min_agreement,
        "min_faults_flagged": cfg.min_faults_flagged,
    }
    scores = {  # for the plot: validation and each fault
        "validation": val_scores,
        **{name: probe_scores[k * n : (k + 1) * n] for k, name in enumerate(FAULTS)},
    }
    return model, entry, scores
