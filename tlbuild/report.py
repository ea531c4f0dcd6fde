"""report.md: the build in one page a person reads in a minute, with its plots beside it.

Reads only files in the export folder (metrics.json, manifest.json, bench.json, gates.json,
build_state.json, heatmaps.json, duplicates.csv), so it can be regenerated at any time and
reads well on a code host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.artifacts import CURVES_PNG, LR_FIND_PNG, METRICS_JSON
from tlbuild.bench.run import BENCH_COLUMNS, bench_cells, short_backend
from tlbuild.ci.headline import validation_summary
from tlbuild.data.duplicates_report import report_section as duplicates_lines
from tlbuild.decision.report_section import decision_lines
from tlbuild.explain.summary import heatmap_lines
from tlbuild.fileio import atomic_path, read_json_or_empty, write_text
from tlbuild.gates import GateResult
from tlbuild.manifest import manifest_json
from tlbuild.novelty.report_section import novelty_lines

REPORT_MD = "report.md"
PER_CLASS_PNG = "report_per_class.png"
LATENCY_PNG = "report_latency_accuracy.png"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    align = align or "l" * len(header)
    marks = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    # A '|' inside a cell would end it early on every Markdown renderer.
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def plot_per_class(val: dict[str, Any], path: Path) -> None:
    """Grouped bars: precision, recall and F1 of each class on the validation split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = list(val["per_class"])
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(classes) + 2), 3.4))
    for i, key in enumerate(("precision", "recall", "f1")):
        vals = [val["per_class"][c][key] for c in classes]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=key)
    ax.set_xticks(x, [f"{c}\n(n={val['per_class'][c]['support']})" for c in classes])
    lowest = min(val["per_class"][c][k] for c in classes for k in ("precision", "recall", "f1"))
    ax.set_ylim(max(0.0, lowest - 0.1), 1.02)  # zoom in: the differences are what matter
    ax.set_ylabel("validation")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_latency_accuracy(bench: dict[str, Any], path: Path) -> bool:
    """Accuracy against batch-1 latency (p50, whisker to p99) per artifact; False if no data."""
    rows = [r for r in bench.get("results", []) if r["accuracy"] is not None]
    batch = min((r["batch"] for r in rows), default=None)
    rows = [r for r in rows if r["batch"] == batch]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for r in rows:
        label = f"{r['artifact']} ({short_backend(r['backend'])})"
        ax.errorbar(
            r["p50_ms"],
            100 * r["accuracy"],
            xerr=[[0], [r["p99_ms"] - r["p50_ms"]]],
            fmt="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    accs = [100 * r["accuracy"] for r in rows]
    pad = max(1.0, (max(accs) - min(accs)) * 0.3)
    ax.set_ylim(max(0.0, min(accs) - pad), min(100.5, max(accs) + pad))
    ax.set_xlabel(f"latency at batch {batch}, ms (dot p50, whisker to p99; log scale)")
    ax.set_ylabel("validation accuracy, %")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def _verdict_lines(manifest: dict[str, Any], gates: list[GateResult]) -> list[str]:
    failed = [g for g in gates if g.failed]
    if not gates:
        verdict = "none configured"
    elif failed:
        names = ", ".join(f"`{g.gate}`" for g in failed)
        verdict = f"**FAILED** ({len(failed)} of {len(gates)}: {names})"
    else:
        verdict = f"**passed** ({len(gates)} of {len(gates)})"
    return [
        f"Gates: {verdict}. Backbone `{manifest.get('model', {}).get('backbone', '?')}`, "
        f"{len(manifest.get('classes', []))} classes, input "
        f"{'x'.join(str(s) for s in manifest.get('preprocessing', {}).get('input_size', []))}.",
        "",
    ]


def _gates_section(gates: list[GateResult]) -> list[str]:
    lines = ["## Gates", ""]
    if not gates:
        return lines + ["No gates configured (recipe section `[gates]`).", ""]
    rows = [
        [
            f"`{g.gate}`",  # globs and brackets would otherwise render as emphasis/links
            f"{g.threshold:g}",
            "-" if g.measured is None else f"{g.measured:.4g}",
            {"passed": "✅ passed", "failed": "❌ FAILED"}.get(g.status, "⚪ " + g.status),
            g.note,
        ]
        for g in gates
    ]
    return lines + _table(["gate", "threshold", "measured", "result", "note"], rows, "lrrll")


def _per_class_lines(out: Path, val: dict[str, Any]) -> list[str]:
    per = val.get("per_class", {})
    rows = [
        [c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])]
        for c, m in per.items()
    ]
    lines = _table(["class", "precision", "recall", "F1", "images"], rows, "lrrrr")
    if per:
        plot_per_class(val, out / PER_CLASS_PNG)
        lines += [f"![per-class metrics]({PER_CLASS_PNG})", ""]
    return lines


_TRAINING_PLOTS = (
    ("confusion_val.png", "confusion matrix"),
    (CURVES_PNG, "training curves"),
    (LR_FIND_PNG, "learning-rate range test"),
)


def _validation_section(out: Path, metrics: dict[str, Any]) -> list[str]:
    val = metrics.get("val", {})
    if not val:
        return []
    lines = ["## Validation", ""]
    lines += _table(["metric", "value"], validation_summary(metrics), "lr")
    lines += _per_class_lines(out, val)
    # lr_find.png exists only when the range test ran: link only what is there.
    for png, alt in _TRAINING_PLOTS:
        if (out / png).is_file():
            lines += [f"![{alt}]({png})", ""]
    return lines


def _speed_vs_fp32(bench: dict[str, Any], file: str) -> str:
    """Throughput against model.onnx at the largest batch both ran: on the same backend, else
    (a TensorRT-only variant such as int8_trt) against FP32 on the GPU through CUDA."""
    rows = bench.get("results", [])
    mine = {(r["backend"], r["batch"]): r for r in rows if r["artifact"] == file}
    fp32 = {(r["backend"], r["batch"]): r for r in rows if r["artifact"] == "model.onnx"}
    pairs = [(k, k) for k in mine if k in fp32]
    note = ""
    if not pairs:
        cuda = "onnxruntime:CUDAExecutionProvider"
        pairs = [(k, (cuda, k[1])) for k in mine if (cuda, k[1]) in fp32]
        note = " vs FP32 on CUDA"
    if not pairs:
        return "-"
    mk, fk = max(pairs, key=lambda p: p[0][1])
    ratio = mine[mk]["throughput_ips"] / fp32[fk]["throughput_ips"]
    return f"{ratio:.2f}x (batch {mk[1]}{note})"


def _search_lines(manifest: dict[str, Any]) -> list[str]:
    out = []
    keep = manifest.get("calibration", {}).get("keep_float", [])
    for v in manifest.get("variants", {}).values():
        s = v.get("search")
        if not s:
            continue
        extra = s["extra_float"]
        kept = f"{len(extra)} more layer(s) kept in float ({', '.join(f'`{n}`' for n in extra)})"
        verdict = "within" if s["within_target"] else "**not within**"
        target = f"{s['target_points']:g}-point target"
        if s.get("changed_tolerance_points") is not None:
            target += f" and {s['changed_tolerance_points']:g}% of answers changed"
        out.append(
            f"- `{v['file']}`: {s['method']} calibration, "
            + (kept if extra else f"no layer in float beyond keep_float {keep}")
            + f"; {s['drop_points']:+.2f} points against FP32 ({s['disagreement_points']:.2f} "
            f"points of answers changed) on {s['images']} {s['images_source']} ({verdict} the "
            f"{target}); "
            f"{len(s['trials'])} trial(s) in {s['seconds']:.0f} s"
        )
        for x in s.get("sensitivity", []):
            out.append(f"  - `{x['node']}`: SQNR {x['sqnr_db']:.1f} dB of its quantized input")
    if out:
        out = ["INT8 search (decided on training images the gate does not use):", "", *out, ""]
    return out


def _variants_section(manifest: dict[str, Any], bench: dict[str, Any]) -> list[str]:
    variants = manifest.get("variants", {})
    if not variants:
        return []

    def changed(v: dict[str, Any]) -> str:  # absent from folders built before it was measured
        n = v.get("answers_changed")
        return "-" if n is None else f"{n} of {v.get('images')}"

    def bound(v: dict[str, Any]) -> str:
        b = v.get("drop_upper_points")
        return "-" if b is None else f"<= {b:.2f}"

    rows = [
        [
            f"`{v['file']}`",
            v["precision"],
            _pct(v["accuracy"]),
            f"{v['drop_points']:+.2f}",
            bound(v),
            changed(v),
            _speed_vs_fp32(bench, v["file"]),
            v["status"],
        ]
        for v in variants.values()
    ]
    header = [
        "file",
        "precision",
        "accuracy",
        "drop (points)",
        "drop, 95% bound",
        "answers changed",
        "speed vs FP32",
        "status",
    ]
    reasons = [
        f"- `{v['variant']}` rejected: {v['reason']}" for v in variants.values() if v.get("reason")
    ]
    return (
        ["## Precision variants", ""]
        + _table(header, rows, "llrrrrrl")
        + ([*reasons, ""] if reasons else [])
        + _search_lines(manifest)
    )


def _engines_section(manifest: dict[str, Any]) -> list[str]:
    engines = manifest.get("engines")
    if not engines:
        return []
    lines = ["## TensorRT engines", ""]
    if engines.get("status") != "built":
        return lines + [f"Skipped: {' '.join(str(engines.get('reason', '')).split())}", ""]
    rows = [
        [variant, f"`{e.get('path', '-')}`", e.get("status", "-"), e.get("reason", "")]
        for variant, e in engines.get("engines", {}).items()
    ]
    return lines + _table(["variant", "engine", "status", "note"], rows)


def _bench_setup_line(bench: dict[str, Any]) -> str:
    env, settings = bench["environment"], bench["settings"]
    driver = f" (driver {env['gpu_driver']})" if env.get("gpu_driver") else ""
    gpu = f", GPU {', '.join(env['gpus'])}{driver}" if env["gpus"] else ""
    return (
        f"{env['cpu']}, {env['cores']} cores{gpu}; {settings['threads']} threads; "
        f"at least {settings['min_iters']} timed runs and "
        f"{settings['min_seconds']:g} s per row after "
        f"{settings['warmup_iters']} warm-up runs (at most "
        f"{settings['max_seconds']:g} s). Latency is host to host."
    )


def _bench_section(out: Path, bench: dict[str, Any]) -> list[str]:
    if not bench.get("results"):
        return []
    lines = ["## Benchmark", "", _bench_setup_line(bench), ""]
    rows = [
        [f"`{c}`" if i == 0 else c for i, c in enumerate(bench_cells(r))] for r in bench["results"]
    ]
    lines += _table(list(BENCH_COLUMNS), rows, "llrrrrrrrr")
    if plot_latency_accuracy(bench, out / LATENCY_PNG):
        lines += [f"![latency vs accuracy]({LATENCY_PNG})", ""]
    for s in bench.get("skipped", []):
        lines.append(f"- not benchmarked: `{s['artifact']}`: {' '.join(s['reason'].split())}")
    if bench.get("skipped"):
        lines.append("")
    return lines


def _stages_section(stages: list[dict[str, Any]]) -> list[str]:
    if not stages:
        return []
    rows = [[s["stage"], s["finished"], f"{s['seconds']:.1f}", s["summary"]] for s in stages]
    header = ["stage", "built (UTC)", "seconds", "result"]
    return ["## Build stages", ""] + _table(header, rows, "llrl")


def _versions_section(manifest: dict[str, Any]) -> list[str]:
    versions = manifest.get("versions", {})
    if not versions:
        return []
    return ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]


def write_report(out: Path, gates: list[GateResult], stages: list[dict[str, Any]]) -> Path:
    """Write report.md (and its plots) for the export folder `out`.

    `stages`: one dict per built stage with `stage`, `finished`, `seconds` and `summary`.
    """
    metrics = read_json_or_empty(out / METRICS_JSON)
    manifest = manifest_json(out)
    bench = read_json_or_empty(out / "bench.json")
    lines = [f"# Build report: {manifest.get('name', out.name)}", ""]
    lines += _verdict_lines(manifest, gates)
    lines += _gates_section(gates)
    lines += duplicates_lines(out)  # before the accuracy that leaks would inflate
    lines += _validation_section(out, metrics)
    lines += decision_lines(out, manifest)
    lines += novelty_lines(out, manifest)
    lines += heatmap_lines(out)
    lines += _variants_section(manifest, bench)
    lines += _engines_section(manifest)
    lines += _bench_section(out, bench)
    lines += _stages_section(stages)
    lines += _versions_section(manifest)
    path = out / REPORT_MD
    write_text(path, "\n".join(lines))
    return path
