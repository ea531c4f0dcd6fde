"""The few figures a CI page shows for a command (GitHub's job summary, MLflow tags): read from
the export folder's files alone, with nothing heavier than the standard library, so that
`tlbuild bench DIR` on a device (no PyTorch) can say them too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.artifacts import METRICS_JSON
from tlbuild.fileio import read_json_or_empty
from tlbuild.manifest import manifest_json


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def validation_summary(metrics: dict[str, Any]) -> list[list[str]]:
    """(label, value) rows of the validation headline: images, accuracy, F1, rates, gain."""
    val = metrics["val"]
    summary = [
        ["images", str(val.get("images", "-"))],
        ["accuracy", _pct(val.get("accuracy"))],
        ["macro F1", f"{val.get('macro_f1', 0):.3f}"],
    ]
    if "escape_rate" in val:
        summary += [
            ["escape rate (defect predicted ok)", _pct(val["escape_rate"])],
            ["false-reject rate (ok predicted defect)", _pct(val["false_reject_rate"])],
        ]
    head = metrics.get("head_only")
    if head:
        gain = (val.get("accuracy", 0.0) - head["accuracy"]) * 100
        summary.append(
            [f"head only ({head['source']})", f"{_pct(head['accuracy'])} ({gain:+.1f} pts)"]
        )
    for r in metrics.get("lr_find", []):
        summary.append([f"lr found for stage '{r['stage']}'", f"{r['chosen']:.3g}"])
    return summary


def build_headline(out: Path) -> list[list[str]]:
    """The figures a CI page shows for a build: validation's headline, what ships, and the
    fastest CPU artifact's latency at the smallest batch benchmarked."""
    metrics = read_json_or_empty(out / METRICS_JSON)
    manifest = manifest_json(out)
    bench = read_json_or_empty(out / "bench.json")
    rows = validation_summary(metrics) if "val" in metrics else []
    shipped = [
        v["file"] for v in manifest.get("variants", {}).values() if v["status"] == "accepted"
    ]
    rows.append(["ships", ", ".join(["model.onnx", *shipped]) if manifest else "-"])
    cpu = [r for r in bench.get("results", []) if "CPU" in r["backend"]]
    if cpu:
        batch = min(r["batch"] for r in cpu)
        best = min((r for r in cpu if r["batch"] == batch), key=lambda r: r["p50_ms"])
        rows.append(
            [
                f"fastest on this CPU, batch {batch}",
                f"{best['artifact']}: p50 {best['p50_ms']:.2f} ms",
            ]
        )
    return rows


def classify_headline(summary: Any) -> list[list[str]]:
    """A classify run's figures (its Summary): images, unreadable, flagged, rate."""
    return [
        ["images", f"{summary.rows} ({summary.errors} could not be read)"],
        ["flagged defective", str(summary.defective)],
        ["flagged novel", str(summary.novel)],
        ["rate", f"{summary.rate:.1f} images/s"],
    ]


def bench_headline(out: Path) -> list[list[str]]:
    """Each benchmarked artifact's p50 at the smallest batch and throughput at the largest."""
    rows = read_json_or_empty(out / "bench.json").get("results", [])
    lines = []
    for key in dict.fromkeys((r["artifact"], r["backend"]) for r in rows):
        mine = sorted(
            (r for r in rows if (r["artifact"], r["backend"]) == key), key=lambda r: r["batch"]
        )
        lo, hi = mine[0], mine[-1]
        lines.append(
            [
                f"{key[0]} on {key[1]}",
                f"p50 {lo['p50_ms']:.2f} ms (batch {lo['batch']}), "
                f"{hi['throughput_ips']:.0f} img/s (batch {hi['batch']})",
            ]
        )
    return lines
