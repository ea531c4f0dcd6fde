"""The decision stage's work: choose the threshold on the validation split's FP32 probabilities,
then measure it on the test split and on every shipped ONNX artifact.

The choice uses model.pt's logits that training stored (eval_logits.json: the numbers
metrics.json was computed from), so it is made once, on FP32. The artifacts that `classify`
actually runs (INT8, FP16) shift p(ok) slightly, so each is run on the validation images here
and judged at the same threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from tlbuild.artifacts import CPU_ORDER, MODEL_ONNX, ONNX_ARTIFACTS
from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.decision.operating_point import (
    REVIEW_THRESHOLDS,
    Counts,
    Target,
    choose,
    counts_at,
    curve,
    rule,
    why_not_met,
    wilson,
)
from tlbuild.decision.plot import DECISION_PNG, plot_decision
from tlbuild.errors import DataError, UsageError
from tlbuild.manifest import Manifest
from tlbuild.recipe import DecisionConfig
from tlbuild.runtime.base import softmax
from tlbuild.runtime.providers import CPU, Placement
from tlbuild.train.eval_logits import read_eval_logits

_ESCAPED_SHOWN = 20  # escaping validation files named in the manifest, at most
_BY_FILE = {a.file: a for a in ONNX_ARTIFACTS.values()}


def target_of(cfg: DecisionConfig) -> Target:
    """The recipe's [decision] as a Target."""
    if cfg.max_escape_rate is not None:
        return Target("escape_rate", cfg.max_escape_rate, cfg.confidence, cfg.require_upper_bound)
    assert cfg.max_false_reject_rate is not None
    return Target(
        "false_reject_rate", cfg.max_false_reject_rate, cfg.confidence, cfg.require_upper_bound
    )


def _stat(count: int, total: int, confidence: float) -> dict[str, Any]:
    low, high = wilson(count, total, confidence)
    rate = count / total if total else 0.0
    return {"count": count, "total": total, "rate": rate, "wilson": [low, high]}


def counts_json(c: Counts, confidence: float) -> dict[str, Any]:
    """Escapes and false rejects with their rates and Wilson intervals."""
    return {
        "escapes": _stat(c.escapes, c.defective, confidence),
        "false_rejects": _stat(c.false_rejects, c.ok, confidence),
    }


def _p_ok(logits: np.ndarray, ok: int) -> np.ndarray:
    # The same float32 softmax classify applies (Predictor.predict), so the comparison with the
    # threshold here is the one classify makes.
    return softmax(logits)[:, ok]


def _check_both_kinds(is_ok: np.ndarray, ok_class: str) -> None:
    if is_ok.all() or not is_ok.any():
        kind = "defective" if is_ok.all() else f"'{ok_class}'"
        raise DataError(
            f"the validation split has no {kind} images, so the [decision] threshold cannot be "
            "chosen; add images of that kind or a larger data.split.val"
        )


def _artifact_p_ok(
    out: Path, manifest: Manifest, paths: Sequence[str], ok: int, console: Console, on: Placement
) -> dict[str, np.ndarray]:
    """p(ok) of model.onnx and of every accepted variant on the validation images, run as the
    quantize gate runs them (`on`, int8_cpu on the CPU; int8_trt with Q/DQ as written)."""
    from tlbuild.runtime.backends import open_onnx

    files = [MODEL_ONNX] + [
        v.file
        for v in manifest.variants.values()
        if v.status == "accepted" and v.file in _BY_FILE and (out / v.file).is_file()
    ]
    predictors = {
        f: open_onnx(
            out / f, simulate_qdq=_BY_FILE[f].simulate_qdq, on=on.for_artifact(_BY_FILE[f])
        )
        for f in files
    }
    spec = Preprocessing.from_dict(manifest.preprocessing)
    probs: dict[str, list[np.ndarray]] = {f: [] for f in files}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Threshold on the shipped artifacts", total=len(paths))
        for i in range(0, len(paths), 32):
            x = load_batch([Path(p) for p in paths[i : i + 32]], spec)
            for f, p in predictors.items():
                probs[f].append(_p_ok(p.logits(x), ok))
            progress.advance(task, len(x))
    return {f: np.concatenate(p) for f, p in probs.items()}


def choice_entry(
    p_ok: np.ndarray, is_ok: np.ndarray, paths: Sequence[str], cfg: DecisionConfig, ok_class: str
) -> dict[str, Any]:
    """The threshold for `cfg` over validation scores and what it achieves there: the
    manifest's entry before the test split and the artifacts are added."""
    _check_both_kinds(is_ok, ok_class)
    target = target_of(cfg)
    choice = choose(curve(p_ok, is_ok), target)
    t, conf = choice.threshold, cfg.confidence
    at = counts_at(p_ok, is_ok, t)  # as classify compares; equal to choice.counts by design
    return {
        "threshold": t,
        "rule": rule(ok_class, t),
        "ok_class": ok_class,
        "target": {target.key: target.limit},
        "confidence": conf,
        "require_upper_bound": cfg.require_upper_bound,
        "met": choice.met,
        "why_not_met": None if choice.met else why_not_met(choice, target, ok_class),
        "chosen_on": {
            "artifact": "model.pt",
            "precision": "fp32",
            "split": "val",
            "images": len(p_ok),
            "runtime": "PyTorch (CPU), training's evaluation (eval_logits.json)",
        },
        "val": counts_json(at, conf),
        "escaped": [
            f"{Path(paths[i]).parent.name}/{Path(paths[i]).name}"
            for i in np.argsort(-p_ok, kind="stable")
            if not is_ok[i] and p_ok[i] >= t
        ][:_ESCAPED_SHOWN],
        "thresholds": [
            {"threshold": x, **counts_json(counts_at(p_ok, is_ok, x), conf)}
            for x in sorted({*REVIEW_THRESHOLDS, t})
        ],
    }


def decide(
    out: Path, manifest: Manifest, cfg: DecisionConfig, console: Console, on: Placement = CPU
) -> dict[str, Any]:
    """Choose the threshold, measure it everywhere, draw the curve; the manifest's entry.
    `on`: where the shipped artifacts run."""
    ok_class = manifest.ok_class
    if ok_class is None:
        raise UsageError(
            f"the model in {out} was trained without data.ok_class; retrain (`tlbuild run`) "
            "with it set"
        )
    ok = manifest.classes.index(ok_class)
    splits = read_eval_logits(out, manifest.classes)
    if "val" not in splits:
        raise UsageError(f"{out} has no validation logits; run `tlbuild train` again")
    val = splits["val"]
    p_ok, is_ok = _p_ok(val.logits, ok), val.labels == ok
    entry = choice_entry(p_ok, is_ok, val.paths, cfg, ok_class)
    target, t, conf = target_of(cfg), entry["threshold"], cfg.confidence
    if "test" in splits:
        test = splits["test"]
        test_counts = counts_at(_p_ok(test.logits, ok), test.labels == ok, t)
        entry["test"] = {**counts_json(test_counts, conf), "met": target.met(test_counts)}
    points: dict[str, Counts] = {}
    for f, probs in _artifact_p_ok(out, manifest, val.paths, ok, console, on).items():
        points[f] = counts_at(probs, is_ok, t)
    entry["artifacts"] = {
        f: {
            "precision": _BY_FILE[f].precision,
            "evaluated_with": on.for_artifact(_BY_FILE[f]).label
            + (", Q/DQ as written (TensorRT's arithmetic)" if _BY_FILE[f].simulate_qdq else ""),
            **counts_json(a, conf),
            "met": target.met(a),
        }
        for f, a in points.items()
    }
    # What `tlbuild classify` picks on a CPU; a GPU machine's engine is judged on the device.
    entry["classify_cpu"] = next(f for f in (*CPU_ORDER, MODEL_ONNX) if f in points)
    at = counts_at(p_ok, is_ok, t)
    plot_decision(curve(p_ok, is_ok), t, at, target, points, out / DECISION_PNG, ok_class)
    return entry
