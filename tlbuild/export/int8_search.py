"""Accuracy-aware INT8: when a variant changes too many answers, search for one that does not.

The way NNCF's `quantize_with_accuracy_control` and Intel Neural Compressor's tuning work, on a
budget of trials (one trial = quantize + evaluate):
1. the configured calibration method and keep_float;
2. the other calibration methods, the best of them kept;
3. with that method, the layers whose quantized inputs lose the most signal (lowest SQNR,
   measured once, in one pass) kept in float: 1, 2, 4, 8, ... of them, fewest first.
It stops at the first trial within the target (accuracy points lost, and answers changed
where quantize.max_changed is set) and otherwise keeps the best one seen.

Decisions are made on training images held out of training (data.holdout; not the validation
split the final gate uses, so that gate stays honest), by the measure the gate applies: accuracy
points lost against FP32 (and answers changed, where quantize.max_changed gates them too); among
trials that lose as much, the one that changes fewer answers wins. (Requiring top-1 agreement
by default was measured too strict: on the textures set INT8 changed 2-3% of answers both ways
at no loss, and the search spent its whole budget to ship the first trial anyway.)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tlbuild.errors import BuildError, TlbuildError
from tlbuild.export.quantize import Int8Job, make_int8
from tlbuild.fileio import atomic_path
from tlbuild.runtime.backends import open_onnx
from tlbuild.runtime.providers import CPU, Placement

METHODS = ("minmax", "entropy", "percentile")
# SQNR is measured on this many search images: the pass keeps every quantized tensor.
SENSITIVITY_IMAGES = 16


@dataclass
class Trial:
    """One quantization tried: its settings and how often it disagreed with FP32."""

    method: str
    extra_float: list[str]
    drop_points: float  # accuracy lost against FP32 on the search images
    disagreement_points: float  # answers changed against FP32
    seconds: float

    def key(self) -> tuple[float, float]:
        """Better first: less accuracy lost, then fewer answers changed."""
        return (self.drop_points, self.disagreement_points)


@dataclass
class SearchResult:
    """What the search chose, what it tried, and why."""

    method: str
    extra_float: list[str]
    drop_points: float
    disagreement_points: float
    target_points: float
    tolerance_points: float  # the target, or one search image's worth if that is more
    changed_tolerance_points: float | None  # the same for quantize.max_changed, where set
    images: int
    images_source: str
    trials: list[Trial] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # the chosen layers' SQNR
    seconds: float = 0.0
    within_target: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return asdict(self)


def _logits(
    path: Path, images: np.ndarray, simulate_qdq: bool, on: Placement, batch: int = 32
) -> np.ndarray:
    try:
        return open_onnx(path, simulate_qdq=simulate_qdq, on=on).logits_in_batches(images, batch)
    except TlbuildError:
        raise
    except Exception as e:  # a library failure while scoring a trial: one message
        raise BuildError(
            f"onnxruntime could not run {path.name} in the INT8 search "
            f"({type(e).__name__}: {e}); set quantize.search_budget = 0, or report the backbone"
        ) from e


def layer_sensitivity(
    qdq_path: Path, images: np.ndarray, on: Placement = CPU
) -> list[tuple[str, float]]:
    """(node, SQNR dB) for every node fed by a quantized activation, least SQNR first.

    SQNR of an activation is measured across its own QuantizeLinear/DequantizeLinear pair
    (the tensor before quantization against the one after), so it isolates what quantizing
    that tensor costs, not the error accumulated upstream.
    """
    model = onnx.load(str(qdq_path))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    pairs: list[tuple[str, str]] = []  # (float tensor, dequantized tensor)
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        for dq in by_input.get(q.output[0], []):
            if dq.op_type == "DequantizeLinear":
                pairs.append((q.input[0], dq.output[0]))
    existing = {o.name for o in graph.output}
    for name in {t for pair in pairs for t in pair} - existing:
        graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(model, str(probe))
        predictor = open_onnx(probe, simulate_qdq=True, on=on)
        signal: dict[str, float] = {src: 0.0 for src, _ in pairs}
        noise: dict[str, float] = {src: 0.0 for src, _ in pairs}
        # One image at a time: every quantized tensor is an output, twice.
        for i in range(len(images)):
            outs = predictor.outputs(images[i : i + 1])
            for src, deq in pairs:
                x = outs[src].astype(np.float64)
                signal[src] += float((x**2).sum())
                noise[src] += float(((x - outs[deq]) ** 2).sum())
            del outs
    worst: dict[str, float] = {}
    for src, deq in pairs:
        n = noise[src]
        sqnr = 10 * np.log10(signal[src] / n) if n > 0 else float("inf")
        for consumer in by_input.get(deq, []):
            if consumer.op_type not in ("QuantizeLinear", "DequantizeLinear") and consumer.name:
                worst[consumer.name] = min(worst.get(consumer.name, float("inf")), sqnr)
    return sorted(worst.items(), key=lambda kv: kv[1])


@dataclass(frozen=True)
class SearchImages:
    """The search's images (training images held out of training, preprocessed), their labels,
    where they come from, and FP32's answers on them when the caller has them (one pass serves
    every variant; computed here otherwise)."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    fp32_top1: np.ndarray | None = None
    on: Placement = CPU  # where trials run (int8_cpu's on the CPU whatever this says)


@dataclass(frozen=True)
class SearchGoal:
    """What the search aims at: at most `target_points` lost against FP32 (and at most
    `max_changed` percent of answers changed, where set), in `budget` trials. `floor`: a
    target finer than one search image counts as one image's worth."""

    target_points: float
    budget: int
    floor: bool = True
    max_changed: float | None = None

    def tolerance(self, target: float, images: int) -> float:
        """`target`, or one of `images`' worth where that is more (with `floor`)."""
        # One image of the search set is the finest step it can measure: with 84 images a
        # single changed answer is 1.19 points, and a 1-point target could never be met (the
        # demo spent its whole budget on a variant that loses nothing on validation).
        # Rounded as each trial's figures are: one image of 60 is 1.6667 points either way
        # (not 1.6667 against 1.66666..., which missed by the rounding and spent a trial).
        return round(max(target, 100.0 / images) if self.floor else target, 4)


class _Trials:
    """The search's trials in the order they ran; their files in a temporary folder (`with`)."""

    def __init__(
        self, job: Int8Job, search: SearchImages, on_trial: Callable[[Trial], None] | None
    ) -> None:
        self.job, self.on_trial = job, on_trial
        self.on = search.on.for_artifact(job.artifact)
        self.images, self.labels = search.images, search.labels
        fp32_top1 = search.fp32_top1
        self.ref = (
            _logits(job.src, self.images, False, search.on).argmax(1)
            if fp32_top1 is None
            else fp32_top1
        )
        self.ref_acc = float((self.ref == self.labels).mean())
        self.done: list[Trial] = []
        self.files: dict[int, Path] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="tlbuild-int8-search-"))

    def __enter__(self) -> _Trials:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __call__(self, method: str, extra: list[str]) -> Trial:
        """Quantize with `method` and `extra` nodes kept in float too, score it, record it."""
        t = time.perf_counter()
        path = self.tmp / f"trial{len(self.done)}.onnx"
        keep_float = (*self.job.settings.keep_float, *extra)
        settings = replace(self.job.settings, method=method, keep_float=keep_float)
        make_int8(replace(self.job, dst=path, settings=settings))
        got = _logits(path, self.images, self.job.artifact.simulate_qdq, self.on).argmax(1)
        drop = round(100 * (self.ref_acc - float((got == self.labels).mean())), 4)
        done = Trial(method, extra, drop, round(100 * float((got != self.ref).mean()), 4), 0.0)
        done.seconds = round(time.perf_counter() - t, 2)
        self.files[len(self.done)] = path
        self.done.append(done)
        if self.on_trial:
            self.on_trial(done)
        return done

    def file(self, trial: Trial) -> Path:
        """The model `trial` wrote."""
        return self.files[self.done.index(trial)]


def _other_methods(run: _Trials, best: Trial, budget: int, ok: Callable[[Trial], bool]) -> Trial:
    """Step 2: the other calibration methods, until one is within the target; the best seen."""
    method = run.job.settings.method
    for m in (m for m in METHODS if m != method):
        if len(run.done) >= budget:
            break
        t = run(m, [])
        if t.key() < best.key():
            best = t
        if ok(best):
            break
    return best


def _float_layers(
    run: _Trials, best: Trial, ranked: list[str], budget: int, ok: Callable[[Trial], bool]
) -> Trial:
    """Step 3: the first 1, 2, 4, ... of `ranked` kept in float too, with `best`'s method."""
    k = 1
    while len(run.done) < budget and k <= len(ranked):
        t = run(best.method, ranked[:k])
        if t.key() < best.key() or ok(t):
            best = t
        if ok(best):
            break
        k *= 2
    return best


def _search(
    run: _Trials, budget: int, ok: Callable[[Trial], bool]
) -> tuple[Trial, list[tuple[str, float]]]:
    """Steps 1-3 of the module docstring in `budget` trials: the trial chosen, the sensitivity."""
    sensitivity: list[tuple[str, float]] = []
    best = run(run.job.settings.method, [])
    if not ok(best) and budget > 1:
        best = _other_methods(run, best, budget, ok)
    if not ok(best) and len(run.done) < budget:
        measured = layer_sensitivity(run.file(best), run.images[:SENSITIVITY_IMAGES], run.on)
        # Only nodes of the FP32 model can be kept in float: the FP16 form of int8_trt adds
        # Cast nodes (at the output) that keep_float would refuse.
        ours = {n.name for n in onnx.load(str(run.job.src), load_external_data=False).graph.node}
        sensitivity = [(name, db) for name, db in measured if name in ours]
        best = _float_layers(run, best, [name for name, _ in sensitivity], budget, ok)
    return best, sensitivity


def search_int8(
    job: Int8Job,
    search: SearchImages,
    goal: SearchGoal,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Write `job.dst`: the first trial within the goal's target (else the best one seen)."""
    t0 = time.perf_counter()
    images, target_points = search.images, goal.target_points
    tolerance = goal.tolerance(target_points, len(images))
    changed = None if goal.max_changed is None else goal.tolerance(goal.max_changed, len(images))

    def ok(t: Trial) -> bool:
        return t.drop_points <= tolerance and (changed is None or t.disagreement_points <= changed)

    with _Trials(job, search, on_trial) as run:
        best, sensitivity = _search(run, goal.budget, ok)
        with atomic_path(job.dst) as out:
            shutil.copyfile(run.file(best), out)
    chosen = set(best.extra_float)
    return SearchResult(
        method=best.method,
        extra_float=best.extra_float,
        drop_points=best.drop_points,
        disagreement_points=best.disagreement_points,
        target_points=target_points,
        tolerance_points=tolerance,
        changed_tolerance_points=changed,
        images=len(images),
        images_source=search.source,
        trials=run.done,
        sensitivity=[{"node": n, "sqnr_db": round(s, 2)} for n, s in sensitivity if n in chosen],
        seconds=round(time.perf_counter() - t0, 2),
        within_target=ok(best),
    )
