"""The bench stage: latency, throughput, accuracy and size of every artifact this machine runs."""

from __future__ import annotations

from typing import Any

from tlbuild.artifacts import MODEL_ONNX, MODEL_PT, VARIANTS
from tlbuild.bench.run import BENCH_JSON, BENCH_PARQUET, bench_folder
from tlbuild.data.splits_file import read_split
from tlbuild.errors import UsageError
from tlbuild.manifest import read_manifest_if_any, write_section
from tlbuild.stages.base import Stage, StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    """Benchmark every artifact this machine can run; writes bench.json and bench.parquet."""
    manifest = read_manifest_if_any(ctx.out)
    if manifest is None:
        raise UsageError(f"no manifest.json in {ctx.out}; run `tlbuild run` first")
    val = read_split(ctx.out, "val", manifest.classes)
    result = bench_folder(ctx.out, ctx.recipe.bench, ctx.console, val)
    write_section(
        ctx.out, "bench", {"bench": {"settings": ctx.recipe.bench.model_dump(mode="json")}}, []
    )
    return result


def summarise(result: dict[str, Any]) -> str:
    """How many rows were measured and skipped."""
    return f"{len(result['results'])} measurements, {len(result['skipped'])} skipped"


STAGE = Stage(
    name="bench",
    sections=("bench",),
    inputs=(
        MODEL_PT,
        MODEL_ONNX,
        *(a.file for a in VARIANTS.values()),
        "model_image*.onnx",
        "*.engine",
    ),  # fmt: skip
    outputs=(BENCH_JSON, BENCH_PARQUET),
    run=run,
    summarise=summarise,
    machine=True,
)
