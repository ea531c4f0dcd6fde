"""The report stage: the gates (gates.json) and report.md with its plots."""

from __future__ import annotations

from tlbuild.artifacts import METRICS_JSON
from tlbuild.bench.run import BENCH_JSON
from tlbuild.explain.summary import HEATMAPS_JSON
from tlbuild.fileio import write_json
from tlbuild.gates import GATES_JSON, GateResult, evaluate_gates, gates_json
from tlbuild.incremental import StageRecords
from tlbuild.manifest import write_section
from tlbuild.report import LATENCY_PNG, PER_CLASS_PNG, REPORT_MD, write_report
from tlbuild.report_html import REPORT_HTML, write_report_html
from tlbuild.stages.base import Stage, StageContext


def run(ctx: StageContext) -> list[GateResult]:
    """Evaluate the gates (gates.json) and write report.md with its plots."""
    out = ctx.out
    gates = evaluate_gates(ctx.recipe.gates, out)
    write_json(out / GATES_JSON, gates_json(gates))
    records = StageRecords(out)
    finished = sorted(
        ((name, rec) for name, rec in records.stages.items() if "finished" in rec),
        key=lambda item: item[1]["started"],  # the order they ran in
    )
    stages = [
        {"stage": name, **{k: rec[k] for k in ("finished", "seconds", "summary")}}
        for name, rec in finished
    ]
    # Recorded so that `tlbuild bench DIR` on a device judges the same [gates] without the recipe.
    settings = {"settings": ctx.recipe.gates.model_dump(mode="json"), "file": GATES_JSON}
    write_section(out, "report", {"gates": settings}, [])
    path = write_report(out, gates, stages)
    failed = sum(g.failed for g in gates)
    passed = sum(g.status == "passed" for g in gates)
    page = write_report_html(path, f"Build report: {ctx.recipe.name}", passed, failed)
    ctx.console.print(f"Wrote {path} and {page.name} (self-contained)")
    return gates


def summarise(gates: list[GateResult]) -> str:
    """How many gates passed."""
    failed = sum(g.failed for g in gates)
    return f"{len(gates) - failed} of {len(gates)} gates passed"


STAGE = Stage(
    name="report",
    sections=("gates",),
    # It reads the manifest too; every section's change reaches it through its upstream key.
    inputs=(METRICS_JSON, BENCH_JSON, HEATMAPS_JSON),
    outputs=(REPORT_MD, REPORT_HTML, PER_CLASS_PNG, LATENCY_PNG, GATES_JSON),
    run=run,
    summarise=summarise,
)
