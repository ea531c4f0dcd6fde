"""The quantize stage: FP16 and INT8 variants of model.onnx, each gated against FP32."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from tlbuild.artifacts import MODEL_ONNX, SCRATCH, SPLITS_JSON, VARIANTS, OnnxArtifact
from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.data.scan import Sample
from tlbuild.data.splits_file import read_split
from tlbuild.errors import BuildError, UsageError
from tlbuild.export.calibration import Calibration
from tlbuild.export.gate import evaluate_variants
from tlbuild.export.int8_search import SearchGoal, SearchImages, Trial, search_int8
from tlbuild.export.quantize import (
    Int8Job,
    Int8Settings,
    cpu_has_vnni,
    make_fp16,
    make_int8,
    trt_qdq_problems,
)
from tlbuild.export.rejection import misses_gate, rejection_reason
from tlbuild.manifest import Variant, read_manifest_if_any, write_section
from tlbuild.recipe import QuantizeConfig, Recipe
from tlbuild.runtime.backends import open_onnx
from tlbuild.runtime.providers import Placement
from tlbuild.stages.base import Stage, StageContext


def calibration_samples(train: list[Sample], n: int, seed: int) -> list[Sample]:
    """`n` training samples, seeded, each class in its share of the split (at least one)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for sm in train:
        by_class.setdefault(sm.label, []).append(sm)
    picked: list[Sample] = []
    for label in sorted(by_class):
        group = by_class[label]
        k = min(len(group), max(1, round(n * len(group) / len(train))))
        picked += [group[i] for i in sorted(rng.choice(len(group), k, replace=False))]
    return picked


def _work(out: Path) -> Path:
    return out / SCRATCH / STAGE.name


def _remove_variants(out: Path) -> None:
    for p in STAGE.files(out):
        p.unlink()


def search_samples(
    train: list[Sample], holdout: list[Sample], calib: list[Sample], n: int, seed: int
) -> tuple[list[Sample], str]:
    """The images the INT8 search decides on (never the validation split the gate uses): the
    training images held out of training (data.holdout), else training images other than the
    calibration ones, else the calibration images themselves."""
    if holdout:
        picked = calibration_samples(holdout, min(n, len(holdout)), seed + 1)
        return picked, "training images held out of training (data.holdout)"
    used = {s.path for s in calib}
    rest = [s for s in train if s.path not in used]
    if len(rest) >= 32:
        return calibration_samples(rest, min(n, len(rest)), seed + 1), (
            "training images (the model trained on them; data.holdout keeps some out)"
        )
    return calib, "the calibration images (fewer than 32 training images left over)"


def _make_int8(
    ctx: StageContext, job: Int8Job, search: SearchImages | None
) -> dict[str, Any] | None:
    """One INT8 variant, searched when a budget is set; the search's record, if any."""
    cfg = ctx.recipe.quantize
    if search is None:
        make_int8(job)
        return None

    def show(t: Trial) -> None:
        extra = f", {len(t.extra_float)} more layer(s) in float" if t.extra_float else ""
        ctx.console.print(
            f"  {job.artifact.variant}: {t.method}{extra}: {t.drop_points:+.2f} points against "
            f"FP32, {t.disagreement_points:.2f} points of answers changed ({t.seconds:.1f}s)"
        )

    goal = SearchGoal(cfg.max_drop, cfg.search_budget, max_changed=cfg.max_changed)
    return search_int8(job, search, goal, on_trial=show).to_dict()


def _make_variants(
    ctx: StageContext,
    wanted: list[OnnxArtifact],
    candidates: dict[str, Path],
    calib: list[Sample],
    search: list[Sample],
    search_source: str,
    spec: Preprocessing,
    on: Placement,
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Write each wanted variant to its candidate file; reduce_range as used for int8_cpu, and
    INT8 searches."""
    cfg, out = ctx.recipe.quantize, ctx.out
    reduce_range = not cpu_has_vnni() if cfg.reduce_range == "auto" else bool(cfg.reduce_range)
    searches: dict[str, dict[str, Any]] = {}
    int8 = any(a.precision == "int8" for a in wanted)
    # Collected once per calibration method, in the stage's scratch folder with the candidates.
    calibration = (
        Calibration(out / MODEL_ONNX, load_batch([sm.path for sm in calib], spec), _work(out), on)
        if int8
        else None
    )
    held_out = None
    if int8 and cfg.search_budget:
        x = load_batch([sm.path for sm in search], spec)
        top1 = open_onnx(out / MODEL_ONNX, on=on).logits_in_batches(x, 32)
        labels = np.array([sm.label for sm in search])
        held_out = SearchImages(x, labels, search_source, top1.argmax(1), on)
    settings = Int8Settings(
        cfg.calibration_method, tuple(cfg.keep_float), reduce_range, cfg.percentile, cfg.trt_float
    )
    with Progress(console=ctx.console, transient=True) as progress:
        task = progress.add_task("Making variants", total=len(wanted))
        for a in wanted:
            dst = candidates[a.variant]
            if a.precision == "fp16":
                make_fp16(out / MODEL_ONNX, dst)
            else:
                assert calibration is not None and a.int8 is not None
                record = _make_int8(
                    ctx, Int8Job(out / MODEL_ONNX, dst, calibration, a, settings), held_out
                )
                if record is not None:
                    searches[a.variant] = record
                if a.int8.tensorrt_form and (problems := trt_qdq_problems(dst)):
                    raise BuildError(
                        f"{a.file} is not in the QDQ form TensorRT accepts: "
                        + "; ".join(problems[:5])
                    )
            progress.advance(task)
    return reduce_range, searches


def _publish(
    ctx: StageContext, results: dict[str, Variant], candidates: dict[str, Path], train: int
) -> None:
    """Give each gated candidate its name: its own if accepted, the rejected name (never
    mistaken for one that ships) if not. Nothing has a shippable name before its gate."""
    cfg = ctx.recipe.quantize
    for r in results.values():
        if misses_gate(r, cfg):
            r.status = "rejected"
            r.file = VARIANTS[r.variant].rejected_file
            r.reason = rejection_reason(r, cfg, train)
        candidates[r.variant].replace(ctx.out / r.file)
    _print_variants(ctx.console, results, cfg)
    for r in results.values():
        if r.reason:
            ctx.console.print(f"[yellow]{r.variant} rejected:[/] {escape(r.reason)}")


def _gate_verdict(ctx: StageContext, results: dict[str, Variant]) -> None:
    """With on_fail = "error", a BuildError for the first rejected variant."""
    cfg = ctx.recipe.quantize
    failed = [r for r in results.values() if r.status == "rejected"]
    if failed and cfg.on_fail == "error":
        r = failed[0]
        raise BuildError(
            f'{r.variant} is rejected and quantize.on_fail = "error": {r.reason} It is kept '
            f'for inspection as {r.file}; on_fail = "reject" ships the build without it.'
        )


def _calibration_record(
    cfg: QuantizeConfig, calib: list[Sample], reduce_range: bool
) -> dict[str, Any]:
    return {
        "images": len(calib),
        "method": cfg.calibration_method,
        "percentile": cfg.percentile if cfg.calibration_method == "percentile" else None,
        "keep_float": list(cfg.keep_float),
        "reduce_range_cpu": reduce_range,
        "seed": cfg.seed,
        "file_list_sha256": hashlib.sha256(
            "\n".join(str(sm.path) for sm in calib).encode()
        ).hexdigest(),
        "settings": cfg.model_dump(mode="json"),
    }


def run(ctx: StageContext) -> dict[str, Variant]:
    """Write the FP16 / INT8 variants, gate each on the validation split, record them."""
    out, cfg = ctx.out, ctx.recipe.quantize
    manifest = read_manifest_if_any(out)
    if manifest is None or manifest.onnx is None or not (out / MODEL_ONNX).is_file():
        raise UsageError(f"no verified {MODEL_ONNX} in {out}; run `tlbuild export` first")
    spec = Preprocessing.from_dict(manifest.preprocessing)
    train = read_split(out, "train", manifest.classes)
    val = read_split(out, "val", manifest.classes)
    holdout = read_split(out, "holdout", manifest.classes)
    calib = calibration_samples(train, cfg.calibration_images, cfg.seed)
    search, search_source = search_samples(train, holdout, calib, cfg.search_images, cfg.seed)
    wanted = [VARIANTS[v] for v in cfg.variants]
    _remove_variants(out)
    # Made and gated in a scratch folder (a killed run's is removed by the next build), so no
    # variant is ever under a name that ships before its gate has passed.
    work = _work(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    candidates = {a.variant: work / a.file for a in wanted}
    on = ctx.checks_on()
    try:
        reduce_range, searches = _make_variants(
            ctx, wanted, candidates, calib, search, search_source, spec, on
        )
        results = evaluate_variants(out, wanted, val, spec, files=candidates, on=on)
        for name, record in searches.items():
            results[name].search = record
        _publish(ctx, results, candidates, len(train))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # .scratch/ itself, when no other stage's work is in it
    # Recorded before the verdict: the manifest then describes every file in the folder,
    # including a rejected variant kept for inspection.
    write_section(
        out,
        "quantize",
        {
            "variants": {k: r.model_dump() for k, r in results.items()},
            "calibration": {**_calibration_record(cfg, calib, reduce_range), "on": on.label},
        },
        [r.file for r in results.values()],
    )
    _gate_verdict(ctx, results)
    return results


def _print_variants(console: Console, results: dict[str, Variant], cfg: QuantizeConfig) -> None:
    gate = f"at most {cfg.max_drop:g} points below FP32"
    if cfg.max_changed is not None:
        gate += f", {cfg.max_changed:g}% of answers changed"
    table = Table(title=f"Variants (gate: {gate})", title_justify="left")
    table.add_column("variant")
    table.add_column("file", no_wrap=True)
    for col in ("accuracy", "drop", "95% bound", "changed", "status"):
        table.add_column(col)
    for r in results.values():
        colour = "green" if r.status == "accepted" else "red"
        table.add_row(
            r.variant,
            r.file,
            f"{r.accuracy:.2%}",
            f"{r.drop_points:+.2f}",
            f"<= {r.drop_upper_points:.2f}",
            f"{r.answers_changed} of {r.images}",
            f"[{colour}]{r.status}[/]",
        )
    console.print(table)


def summarise(results: dict[str, Variant]) -> str:
    """Each variant's verdict and drop."""
    return ", ".join(f"{k} {r.status} ({r.drop_points:+.2f} pts)" for k, r in results.items())


def _disabled(recipe: Recipe) -> str | None:
    return None if recipe.quantize.variants else "no variants in [quantize]"


STAGE = Stage(
    name="quantize",
    sections=("quantize",),
    inputs=(MODEL_ONNX, SPLITS_JSON),
    outputs=tuple(p for a in VARIANTS.values() for p in (a.file, a.rejected_file)),
    run=run,
    summarise=summarise,
    disabled=_disabled,
)
