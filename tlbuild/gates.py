"""Release gates: the recipe's thresholds against what the build measured.

Evaluated on every `tlbuild run`, reused stages or not, so a CI job fails whenever the build
is not good enough. A gate that cannot be measured on this machine (a TensorRT engine on a
CPU-only runner) is listed as "not measured" and does not fail the build.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tlbuild.artifacts import METRICS_JSON
from tlbuild.fileio import read_json_or_empty
from tlbuild.manifest import manifest_json
from tlbuild.recipe import GatesConfig

GATES_JSON = "gates.json"


@dataclass(frozen=True)
class GateResult:
    """One gate: what was required, what was measured, and the verdict."""

    gate: str  # e.g. "max_p99_ms[model.onnx, batch 1]"
    threshold: float
    measured: float | None
    status: str  # "passed", "failed" or "not measured"
    note: str = ""

    @property
    def failed(self) -> bool:
        """True when the gate was measured and missed."""
        return self.status == "failed"

    def describe(self) -> str:
        """One line naming the gate, its threshold and the measured value."""
        shown = "-" if self.measured is None else f"{self.measured:.4g}"
        return f"{self.gate}: measured {shown}, threshold {self.threshold:g}" + (
            f" ({self.note})" if self.note else ""
        )


def _check(
    gate: str, threshold: float, measured: float | None, upper: bool, note: str = ""
) -> GateResult:
    if measured is None:
        return GateResult(gate, threshold, None, "not measured", note)
    ok = measured <= threshold if upper else measured >= threshold
    return GateResult(gate, threshold, measured, "passed" if ok else "failed", note)


def _validation_gates(cfg: GatesConfig, val: dict[str, Any]) -> list[GateResult]:
    results = []
    for key, upper in (
        ("min_macro_f1", False),
        ("max_escape_rate", True),
        ("max_false_reject_rate", True),
    ):
        threshold = getattr(cfg, key)
        if threshold is not None:
            metric = key.removeprefix("min_").removeprefix("max_")
            results.append(_check(key, threshold, val.get(metric), upper, "validation split"))
    return results


def _accuracy_gates(
    cfg: GatesConfig, val: dict[str, Any], bench: dict[str, Any]
) -> list[GateResult]:
    if cfg.min_accuracy is None:
        return []
    accuracy = {
        f"{r['artifact']} on {r['backend']}": r["accuracy"]
        for r in bench.get("results", [])
        if r["accuracy"] is not None
    }
    if not accuracy:  # no benchmark accuracy (bench.accuracy = false): training's own
        accuracy["model.pt (training evaluation)"] = val.get("accuracy")
    return [
        _check(f"min_accuracy[{artifact}]", cfg.min_accuracy, value, False)
        for artifact, value in sorted(accuracy.items())
    ]


def _int8_drop_gates(cfg: GatesConfig, manifest: dict[str, Any]) -> list[GateResult]:
    if cfg.max_int8_drop is None:
        return []
    results = []
    for v in manifest.get("variants", {}).values():
        if v["precision"] != "int8":
            continue
        gate, limit, drop = f"max_int8_drop[{v['file']}]", cfg.max_int8_drop, v["drop_points"]
        note = "accuracy points below FP32"
        if v["status"] != "accepted":
            # A gate on INT8 is the recipe saying INT8 is required: a variant the quantize
            # stage rejected (and does not ship) fails it on its measured drop.
            note += "; rejected by the quantize stage, not shipped"
        results.append(_check(gate, limit, drop, True, note))
    return results


def _failed_run_gates(cfg: GatesConfig, bench: dict[str, Any]) -> list[GateResult]:
    if cfg.min_accuracy is None and not cfg.max_p99_ms and not cfg.min_throughput:
        return []
    # An artifact that was tried here and failed must fail its gates, not pass as unmeasured.
    broken = {
        x["artifact"]: x["reason"] for x in bench.get("skipped", []) if x.get("kind") == "failed"
    }
    return [
        GateResult(f"runs[{artifact}]", 1.0, 0.0, "failed", reason)
        for artifact, reason in sorted(broken.items())
    ]


def _speed_gates(cfg: GatesConfig, bench: dict[str, Any]) -> list[GateResult]:
    rows = bench.get("results", [])
    missing = "not benchmarked on this machine" if bench else "no bench.json"
    results = []
    for key, field, upper in (
        ("max_p99_ms", "p99_ms", True),
        ("min_throughput", "throughput_ips", False),
    ):
        for pattern, per_batch in getattr(cfg, key).items():
            for batch, threshold in sorted(per_batch.items()):
                hits = [
                    r
                    for r in rows
                    if r["batch"] == batch and fnmatch.fnmatch(r["artifact"], pattern)
                ]
                if not hits:
                    gate = f"{key}[{pattern}, batch {batch}]"
                    results.append(_check(gate, threshold, None, upper, missing))
                for r in hits:
                    gate = f"{key}[{r['artifact']} on {r['backend']}, batch {batch}]"
                    results.append(_check(gate, threshold, r[field], upper))
    return results


def _decision_gates(manifest: dict[str, Any]) -> list[GateResult]:
    """The [decision] target at its threshold: on the FP32 model it was chosen on, and on each
    shipped ONNX artifact (what classify runs) at the same threshold, all on validation."""
    d = manifest.get("decision")
    if not d:
        return []
    (key, limit), bound = next(iter(d["target"].items())), d["require_upper_bound"]
    stat = "escapes" if key == "max_escape_rate" else "false_rejects"
    parts = "defective parts accepted" if stat == "escapes" else "ok parts rejected"
    results = []
    for name, r in [(d["chosen_on"]["artifact"], d["val"]), *d["artifacts"].items()]:
        x = r[stat]
        measured = x["wilson"][1] if bound else x["rate"]
        note = (
            f"validation: {x['count']} of {x['total']} {parts}, {d['confidence']:.0%} Wilson "
            f"upper bound {x['wilson'][1]:.2%}" + (" (gated)" if bound else "")
        )
        # Where no threshold meets the target, the strictest sensible one is recorded: its own
        # rate may be within the limit (everything rejected), but the choice still failed.
        chosen_failed = name == d["chosen_on"]["artifact"] and not d["met"]
        ok = measured <= limit and not chosen_failed
        if chosen_failed:
            note += f"; {d['why_not_met']}"
        gate = f"decision.{key}[{name}, {d['rule']}]"
        results.append(GateResult(gate, limit, measured, "passed" if ok else "failed", note))
    return results


def _novelty_gates(manifest: dict[str, Any]) -> list[GateResult]:
    """[novelty]'s gates, where the recipe sets them: each shipped variant flags the images FP32
    flags (on validation and the camera-fault probe); the share of the probe the score flags."""
    n = manifest.get("novelty")
    if not n:
        return []
    results = []
    for name, a in n.get("artifacts", {}).items() if n.get("min_agreement") is not None else ():
        note = f"{a['images']} validation and probe images, flags compared with model.onnx"
        gate = f"novelty.min_agreement[{name}]"
        results.append(_check(gate, n["min_agreement"], a["agreement"], False, note))
    if n.get("min_faults_flagged") is not None:
        p = n["probe"]
        note = ", ".join(f"{k} {v:.0%}" for k, v in p["flagged"].items())
        gate = "novelty.min_faults_flagged[model.onnx]"
        results.append(_check(gate, n["min_faults_flagged"], p["faults_flagged"], False, note))
    return results


def bench_gates(cfg: GatesConfig, out: Path) -> list[GateResult]:
    """The gates a benchmark decides (accuracy per artifact, speed, artifacts that would not
    run), against bench.json in `out`: what `tlbuild bench` judges, on a device too."""
    val = read_json_or_empty(out / METRICS_JSON).get("val", {})
    bench = read_json_or_empty(out / "bench.json")
    return [
        *_accuracy_gates(cfg, val, bench),
        *_failed_run_gates(cfg, bench),
        *_speed_gates(cfg, bench),
    ]


def evaluate_gates(cfg: GatesConfig, out: Path) -> list[GateResult]:
    """Every configured gate against metrics.json, manifest.json and bench.json in `out`."""
    val = read_json_or_empty(out / METRICS_JSON).get("val", {})
    manifest = manifest_json(out)
    bench = read_json_or_empty(out / "bench.json")
    return [
        *_validation_gates(cfg, val),
        *_accuracy_gates(cfg, val, bench),
        *_int8_drop_gates(cfg, manifest),
        *_failed_run_gates(cfg, bench),
        *_speed_gates(cfg, bench),
        *_decision_gates(manifest),
        *_novelty_gates(manifest),
    ]


def gates_json(results: list[GateResult]) -> dict[str, Any]:
    """JSON form for gates.json."""
    return {
        "passed": not any(r.failed for r in results),
        "gates": [asdict(r) for r in results],
    }
