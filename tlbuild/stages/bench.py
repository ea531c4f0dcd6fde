"""The bench stage: latency, throughput, accuracy and size of every artifact this machine runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.artifacts import MODEL_ONNX, MODEL_PT, SPLITS_JSON, VARIANTS
from tlbuild.bench.run import BENCH_JSON, BENCH_PARQUET, bench_folder
from tlbuild.data.scan import Sample
from tlbuild.data.splits_file import read_split
from tlbuild.errors import UsageError
from tlbuild.manifest import (
    read_manifest,
    read_manifest_if_any,
    recipe_here,
    recorded_settings,
    write_section,
)
from tlbuild.recipe import BenchConfig
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


def settings_for_folder(folder: Path) -> tuple[BenchConfig, str]:
    """[bench] for an export folder given without a recipe (`tlbuild bench DIR`).

    The recipe it was built from, as it is now, when that file is here and still writes to this
    folder; else the settings the bench stage recorded at home; else the defaults.
    """
    manifest = read_manifest(folder)
    recipe = recipe_here(folder, manifest)
    if recipe is not None:
        return recipe.bench, f"from {recipe.source}"
    recorded = manifest.bench.settings if manifest.bench is not None else {}
    # Folders exported before each stage recorded its own settings carry the whole recipe.
    recorded = recorded or manifest.recipe.get("bench", {})
    if recorded:
        cfg = recorded_settings(BenchConfig, recorded, folder, "bench.settings")
        return cfg, "as recorded in manifest.json"
    return BenchConfig(), "defaults (manifest.json records no [bench] settings)"


def validation_if_here(folder: Path) -> list[Sample] | None:
    """The recorded validation split, if splits.json is here (on a device it usually is not)."""
    if not (folder / SPLITS_JSON).is_file():
        return None
    return read_split(folder, "val", read_manifest(folder).classes)


def summarise(result: dict[str, Any]) -> str:
    """How many rows were measured and skipped."""
    return f"{len(result['results'])} measurements, {len(result['skipped'])} skipped"


STAGE = Stage(
    name="bench",
    sections=("bench",),
    inputs=(MODEL_PT, MODEL_ONNX, *(a.file for a in VARIANTS.values()), "*.engine"),
    outputs=(BENCH_JSON, BENCH_PARQUET),
    run=run,
    summarise=summarise,
    machine=True,
)
