"""The stage graph: train -> export -> quantize -> build -> bench -> report, incremental.

Each stage reads the recipe and the files earlier stages wrote under `recipe.out_dir`, and
writes its own; nothing passes between stages except those files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from tlbuild.data.scan import Sample, Splits, scan_dataset
from tlbuild.data.sizes import size_advice, summarize_sizes
from tlbuild.errors import BuildError, UsageError
from tlbuild.export.checkpoint import TrainedModel, load_trained, recorded_val, save_trained
from tlbuild.export.gate import VariantResult, evaluate_variants
from tlbuild.export.manifest import update_manifest, write_manifest
from tlbuild.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_io
from tlbuild.export.parity import ParityResult, check_parity, load_batch
from tlbuild.export.quantize import (
    VARIANT_FILES,
    cpu_has_vnni,
    make_fp16,
    make_int8,
    trt_qdq_problems,
)
from tlbuild.fileio import atomic_path, read_json_or_empty, write_json, write_text
from tlbuild.gates import GATES_JSON, GateResult, evaluate_gates, gates_json
from tlbuild.incremental import STAGE_NAMES, STAGES, BuildState, StageDef
from tlbuild.models.factory import build_model
from tlbuild.recipe import Recipe
from tlbuild.train.loop import TrainResult, fit
from tlbuild.train.lr_find import plot_lr_find
from tlbuild.train.metrics import (
    classification_metrics,
    fine_tuning_gain,
    plot_confusion,
    plot_history,
)

# Files each stage owns, relative to the recipe's export folder.
MODEL_PT = "model.pt"
MODEL_ONNX = "model.onnx"
SPLITS_JSON = "splits.json"
LAST_CKPT = "checkpoints/last.pt"
LR_FIND_PNG = "lr_find.png"
TRAIN_FILES = [MODEL_PT, "metrics.json", "history.csv", "training_curves.png", SPLITS_JSON]


@dataclass
class TrainOutputs:
    """What the train stage produced."""

    result: TrainResult
    metrics: dict[str, Any]
    splits: Splits


@dataclass
class ExportOutputs:
    """What the export stage produced."""

    onnx_path: Path
    parity: ParityResult
    manifest_path: Path


def load_data(recipe: Recipe, console: Console) -> Splits:
    """Scan and split the recipe's data, reporting counts and skipped files."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Checking images", total=None)
        splits = scan_dataset(recipe.data, lambda n: progress.advance(task, n))
    table = Table(title=f"{len(splits.classes)} classes", title_justify="left")
    counts = splits.counts()
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for c in splits.classes:
        mark = " (ok)" if c == recipe.data.ok_class else ""
        table.add_row(c + mark, *(str(counts[s][c]) for s in counts))
    console.print(table)
    if splits.skipped:
        console.print(f"[yellow]Skipped {len(splits.skipped)} unreadable file(s):[/]")
        for p, why in splits.skipped[:20]:
            console.print(f"  {p}: {why}")
        if len(splits.skipped) > 20:
            console.print(f"  ... and {len(splits.skipped) - 20} more (listed in {SPLITS_JSON})")
    return splits


def _splits_json(splits: Splits) -> dict[str, Any]:
    def paths(samples: list[Sample]) -> list[list[Any]]:
        return [[str(s.path), s.label] for s in samples]

    return {
        "classes": splits.classes,
        "counts": splits.counts(),
        "train": paths(splits.train),
        "val": paths(splits.val),
        "test": paths(splits.test),
        "skipped": [[str(p), why] for p, why in splits.skipped],
    }


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to the export folder {out} ({e.strerror}); "
            "set output_dir in the recipe to a writable folder"
        ) from None


def _remove_leftovers(out: Path) -> None:
    """Temporary files of a killed run (fileio.atomic_path names them .<stem>.<random>.tmp*)."""
    if out.is_dir():
        for p in out.glob(".*.tmp*"):
            p.unlink(missing_ok=True)


def _history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    for row in history:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def _evaluate_split(
    tm: TrainedModel, samples: list[Sample], ok_class: str | None, batch: int = 32
) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from tlbuild.data.dataset import EvalTransform, ImageDataset
    from tlbuild.train.loop import evaluate

    loader = DataLoader(ImageDataset(samples, EvalTransform(tm.preprocessing)), batch_size=batch)
    loss, logits, labels = evaluate(tm.model, loader, torch.device("cpu"), None)
    m = classification_metrics(labels, logits.argmax(1), tm.classes, ok_class)
    m["loss"] = loss
    return m


def train_stage(recipe: Recipe, console: Console, resume: bool = False) -> TrainOutputs:
    """Fine-tune the backbone; write model.pt, history, curves, metrics and confusion plots."""
    out = recipe.out_dir
    _prepare_out_dir(out)
    splits = load_data(recipe, console)

    # Seed before building: the new head's initial weights are part of reproducibility.
    torch.manual_seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)
    images = summarize_sizes([s.path for s in splits.train])
    built = build_model(recipe.model, len(splits.classes), images)
    default_side = max(built.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    advice = size_advice(images, built.preprocessing.input_size, default_side)
    if advice and recipe.model.preprocess.input_size != "auto":
        console.print(f"[yellow]Note: {advice}[/]")
    console.print(
        f"Backbone {recipe.model.backbone}, weights {built.weights_source}, input "
        f"{built.preprocessing.input_size[0]}x{built.preprocessing.input_size[1]} "
        f"({built.preprocessing.resize}, {built.preprocessing.interpolation})"
    )
    ckpt = out / LAST_CKPT
    if not resume and ckpt.is_file():
        console.print(
            f"[yellow]Starting over; an earlier checkpoint ({ckpt}) is replaced. "
            "Use --resume to continue it instead.[/]"
        )
    result = fit(
        built.model,
        splits,
        built.preprocessing,
        recipe.train,
        recipe.data,
        ckpt,
        console,
        resume=resume,
        model_key=recipe.model.model_dump_json(),
    )
    tm = TrainedModel(
        result.model,
        recipe.model.backbone,
        splits.classes,
        built.preprocessing,
        built.weights_source,
        recipe.model.dropout,
        # Export reads these from model.pt itself, so it always checks the model against the
        # split and recipe it was trained with, whatever happened to the folder since.
        meta={
            "best_epoch": result.best_epoch,
            "ok_class": recipe.data.ok_class,
            "val": [[str(s.path), s.label] for s in splits.val],
            "recipe": recipe.to_jsonable(),
        },
    )
    save_trained(out / MODEL_PT, tm)
    write_json(out / SPLITS_JSON, _splits_json(splits))
    write_text(out / "history.csv", _history_csv(result.history))
    plot_history(result.history, out / "training_curves.png")

    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "device": result.device}
    head_only = _head_only(result, recipe)
    if head_only is not None:
        metrics["head_only"] = head_only
    if result.lr_find:
        metrics["lr_find"] = result.lr_find
        plot_lr_find(result.lr_find, out / LR_FIND_PNG)
    else:
        (out / LR_FIND_PNG).unlink(missing_ok=True)  # stale, from another run
    for split in ("val", "test"):
        samples: list[Sample] = getattr(splits, split)
        if samples:
            metrics[split] = _evaluate_split(tm, samples, recipe.data.ok_class)
            plot_confusion(metrics[split], out / f"confusion_{split}.png", f"{recipe.name} {split}")
        else:
            (out / f"confusion_{split}.png").unlink(missing_ok=True)  # stale, from another run
    write_json(out / "metrics.json", metrics)
    v = metrics["val"]
    line = f"Validation accuracy {v['accuracy']:.1%} (macro F1 {v['macro_f1']:.3f})"
    if "escape_rate" in v:
        line += (
            f", escape rate {v['escape_rate']:.1%}, false-reject rate {v['false_reject_rate']:.1%}"
        )
    console.print(f"[bold]{line}[/] — best: {best_label(result.best_epoch)}")
    gain = fine_tuning_gain(metrics)
    if gain:
        console.print(gain)
    return TrainOutputs(result, metrics, splits)


def best_label(epoch: int) -> str:
    """The shipped weights in words: an epoch, or the linear probe (epoch -1)."""
    return f"epoch {epoch + 1}" if epoch >= 0 else "the linear probe (body unchanged)"


def _head_only(result: TrainResult, recipe: Recipe) -> dict[str, Any] | None:
    """What the new head alone reached: the best head-only stage, else the linear probe."""
    frozen = {s.name for s in recipe.train.stages if s.unfreeze == 0}
    rows = [r for r in result.history if r["stage"] in frozen]
    if not rows:
        return result.probe
    best = min(rows, key=lambda r: r["val_loss"])
    return {
        "accuracy": best["val_acc"],
        "loss": best["val_loss"],
        "source": f"stage '{best['stage']}', body frozen",
    }


def _val_samples(tm: TrainedModel, out: Path) -> list[Sample]:
    """The validation split recorded in model.pt at training time."""
    val = recorded_val(tm)
    if not val:
        raise UsageError(f"{out / MODEL_PT} records no validation images; retrain it")
    return val


def _parity_samples(samples: list[Sample], n: int) -> list[Sample]:
    # Evenly spaced through the (class-ordered) split, so every class is represented.
    if len(samples) <= n:
        return samples
    idx = np.linspace(0, len(samples) - 1, n).round().astype(int)
    return [samples[i] for i in idx]


def export_stage(recipe: Recipe, console: Console) -> ExportOutputs:
    """Export model.pt to ONNX, verify it against PyTorch on validation images, write manifest."""
    out = recipe.out_dir
    tm = load_trained(out / MODEL_PT)
    onnx_path = out / MODEL_ONNX
    cfg = recipe.export
    samples = _parity_samples(_val_samples(tm, out), cfg.parity_images)
    images = load_batch([s.path for s in samples], tm.preprocessing)
    _remove_variants(out)  # derived from the previous model.onnx; never mix them with a new one
    # Export beside the final name and check parity before the rename: a model.onnx on disk
    # has always passed its check.
    with atomic_path(onnx_path) as tmp:
        export_onnx(tm.model, tm.preprocessing, tmp, cfg.opset)
        parity = check_parity(tm.model, tmp, images, cfg.parity_atol, cfg.min_top1_agreement)
        if not parity.passed:
            raise BuildError(
                f"ONNX export disagrees with PyTorch on {parity.images} validation images: "
                f"max |logit diff| {parity.max_abs_logit_diff:.2e} "
                f"(allowed {cfg.parity_atol:.1e}), "
                f"top-1 agreement {parity.top1_agreement:.1%} (required "
                f"{cfg.min_top1_agreement:.0%}). Try another export.opset, or report the backbone."
            )
    console.print(
        f"ONNX parity on {parity.images} validation images: max |logit diff| "
        f"{parity.max_abs_logit_diff:.2e}, top-1 agreement {parity.top1_agreement:.1%} [green]ok[/]"
    )
    write_json(out / "labels.json", tm.classes)
    io_desc = onnx_io(onnx_path)
    body = {
        "name": recipe.name,
        "classes": tm.classes,
        "ok_class": tm.meta.get("ok_class"),
        "preprocessing": tm.preprocessing.to_dict(),
        "model": {
            "backbone": tm.backbone,
            "weights_source": tm.weights_source,
            "dropout": tm.dropout,
            "output": "logits (apply softmax for probabilities)",
        },
        "onnx": {
            "file": MODEL_ONNX,
            "opset": io_desc.pop("opset"),
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            **io_desc,
            "parity": parity.to_dict(),
        },
        "metrics": _metrics_summary(out),
        "training": _training_summary(out),
        # The recipe the model was trained with; its export section is this export's.
        "recipe": {**tm.meta.get("recipe", {}), "export": recipe.export.model_dump()},
    }
    artifacts = [
        MODEL_ONNX,
        "labels.json",
        *TRAIN_FILES,
        "confusion_val.png",
        "confusion_test.png",
        LR_FIND_PNG,
    ]
    manifest = write_manifest(out, body, artifacts)
    console.print(f"Wrote {onnx_path} and {manifest}")
    return ExportOutputs(onnx_path, parity, manifest)


def _metrics_summary(out: Path) -> dict[str, Any]:
    path = out / "metrics.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text(encoding="utf-8"))
    keys = ("accuracy", "macro_f1", "escape_rate", "false_reject_rate", "images")
    return {s: {k: m[s][k] for k in keys if k in m[s]} for s in ("val", "test") if s in m}


def _training_summary(out: Path) -> dict[str, Any]:
    """What training chose and reached, for the manifest: head-only accuracy, found rates."""
    m = read_json_or_empty(out / "metrics.json")
    if not m:
        return {}
    best = int(m["best_epoch"])
    summary: dict[str, Any] = {"best_epoch": best, "shipped": best_label(best)}  # -1: the probe
    if "head_only" in m:
        summary["head_only"] = {k: m["head_only"][k] for k in ("accuracy", "source")}
    if m.get("lr_find"):
        summary["lr_find"] = [
            {k: r[k] for k in ("stage", "chosen", "steps", "rule")} for r in m["lr_find"]
        ]
    return summary


def _remove_variants(out: Path) -> None:
    for engine in out.glob("model.*.engine"):
        engine.unlink()
    for name in VARIANT_FILES.values():
        for p in (out / name, out / name.replace(".onnx", ".rejected.onnx")):
            p.unlink(missing_ok=True)


def _calibration_samples(train: list[Sample], n: int, seed: int) -> list[Sample]:
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


def quantize_stage(recipe: Recipe, console: Console) -> dict[str, VariantResult]:
    """Write the FP16 / INT8 variants, gate each on the validation split, update the manifest."""
    out = recipe.out_dir
    cfg = recipe.quantize
    tm = load_trained(out / MODEL_PT)
    fp32 = out / MODEL_ONNX
    manifest_path = out / "manifest.json"
    if not fp32.is_file() or not manifest_path.is_file():
        raise UsageError(f"no verified {MODEL_ONNX} in {out}; run `tlbuild export` first")
    splits = json.loads((out / SPLITS_JSON).read_text(encoding="utf-8"))
    if splits["classes"] != tm.classes:
        raise UsageError(f"{SPLITS_JSON} and {MODEL_PT} disagree; run `tlbuild train` again")
    train = [Sample(Path(p), int(label)) for p, label in splits["train"]]
    val = _val_samples(tm, out)
    calib = _calibration_samples(train, cfg.calibration_images, cfg.seed)
    reduce_range = not cpu_has_vnni() if cfg.reduce_range == "auto" else bool(cfg.reduce_range)

    made: dict[str, tuple[Path, bool]] = {}
    _remove_variants(out)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Building variants", total=len(cfg.variants))
        images = (
            load_batch([sm.path for sm in calib], tm.preprocessing)
            if any(v.startswith("int8") for v in cfg.variants)
            else None
        )
        for v in cfg.variants:
            dst = out / VARIANT_FILES[v]
            if v == "fp16":
                make_fp16(fp32, dst)
            else:
                assert images is not None
                flavour = v.removeprefix("int8_")
                make_int8(
                    fp32,
                    dst,
                    images,
                    flavour,
                    cfg.calibration_method,
                    list(cfg.keep_float),
                    reduce_range,
                    cfg.percentile,
                )
                if flavour == "trt" and (problems := trt_qdq_problems(dst)):
                    dst.unlink()
                    raise BuildError(
                        f"{dst.name} is not in the QDQ form TensorRT accepts: "
                        + "; ".join(problems[:5])
                    )
            made[v] = (dst, v == "int8_trt")
            progress.advance(task)
        del images
    _, results = evaluate_variants(fp32, made, val, tm.preprocessing)

    failed = [r for r in results.values() if r.drop_points > cfg.max_drop]
    for r in failed:
        r.status = "rejected"
    _print_variants(console, results, cfg.max_drop)
    for r in failed:  # a rejected file must not look shippable, whatever happens next
        src = out / r.file
        r.file = r.file.replace(".onnx", ".rejected.onnx")
        src.replace(out / r.file)
    if failed and cfg.on_fail == "error":
        r = failed[0]
        raise BuildError(
            f"{r.variant} loses {r.drop_points:.2f} accuracy points against FP32 "
            f"({r.accuracy:.2%} vs {r.fp32_accuracy:.2%}; quantize.max_drop = {cfg.max_drop}); "
            f'kept for inspection as {r.file}. Try calibration_method = "entropy" or '
            '"percentile", more calibration_images, or more layers in keep_float; or set '
            'on_fail = "reject" to ship without it.'
        )

    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest.pop("engines", None)  # _remove_variants deleted them; `build` makes new ones
    manifest["variants"] = {k: r.to_dict() for k, r in results.items()}
    manifest["calibration"] = {
        "images": len(calib),
        "method": cfg.calibration_method,
        "percentile": cfg.percentile if cfg.calibration_method == "percentile" else None,
        "keep_float": list(cfg.keep_float),
        "reduce_range_cpu": reduce_range,
        "seed": cfg.seed,
        "file_list_sha256": hashlib.sha256(
            "\n".join(str(sm.path) for sm in calib).encode()
        ).hexdigest(),
    }
    update_manifest(out, manifest, [r.file for r in results.values()])
    return results


def _print_variants(console: Console, results: dict[str, VariantResult], max_drop: float) -> None:
    table = Table(
        title=f"Variants (gate: at most {max_drop:g} points below FP32)", title_justify="left"
    )
    for col in ("variant", "file", "accuracy", "drop", "agree w/ FP32", "status"):
        table.add_column(col)
    for r in results.values():
        colour = "green" if r.status == "accepted" else "red"
        table.add_row(
            r.variant,
            r.file,
            f"{r.accuracy:.2%}",
            f"{r.drop_points:+.2f}",
            f"{r.top1_agreement:.1%}",
            f"[{colour}]{r.status}[/]",
        )
    console.print(table)


def engines_stage(recipe: Recipe, console: Console) -> dict[str, Any]:
    """TensorRT engines for the recipe's export folder, gated on its validation images."""
    from tlbuild.export.engines import build_stage

    out = recipe.out_dir
    if not (out / "manifest.json").is_file():
        raise UsageError(f"no manifest.json in {out}; run `tlbuild run` first")
    tm = load_trained(out / MODEL_PT)
    val = _val_samples(tm, out)
    return build_stage(out, recipe.build, console, val, recipe.quantize.max_drop)


def bench_stage(recipe: Recipe, console: Console) -> dict[str, Any]:
    """Benchmark every artifact this machine can run; writes bench.json and bench.parquet."""
    from tlbuild.bench.run import bench_folder

    out = recipe.out_dir
    if not (out / "manifest.json").is_file():
        raise UsageError(f"no manifest.json in {out}; run `tlbuild run` first")
    val = _val_samples(load_trained(out / MODEL_PT), out)
    return bench_folder(out, recipe.bench, console, val)


def report_stage(recipe: Recipe, console: Console) -> list[GateResult]:
    """Evaluate the gates (gates.json) and write report.md with its plots."""
    from tlbuild.report import write_report

    out = recipe.out_dir
    gates = evaluate_gates(recipe.gates, out)
    write_json(out / GATES_JSON, gates_json(gates))
    state = BuildState(out)
    stages = [
        {"stage": name, **{k: state.stages[name][k] for k in ("finished", "seconds", "summary")}}
        for name in STAGE_NAMES
        if name in state.stages
    ]
    path = write_report(out, gates, stages)
    console.print(f"Wrote {path}")
    return gates


@dataclass
class StageOutcome:
    """What `run` did with one stage."""

    stage: str
    action: str  # "ran", "reused" or "disabled"
    why: list[str]
    seconds: float = 0.0


@dataclass
class RunResult:
    """The outcome of `run`: per-stage actions and the gates."""

    out: Path
    stages: list[StageOutcome]
    gates: list[GateResult]

    @property
    def failed_gates(self) -> list[GateResult]:
        """Gates that were measured and missed."""
        return [g for g in self.gates if g.failed]


def _enabled(recipe: Recipe, stage: str) -> bool:
    return {"quantize": bool(recipe.quantize.variants), "build": bool(recipe.build.variants)}.get(
        stage, True
    )


def _disable(out: Path, stage: str) -> None:
    """A stage turned off in the recipe takes its files and manifest sections with it, so
    nothing downstream (bench, classify, gates) keeps using what it made earlier."""
    if stage == "quantize":
        _remove_variants(out)
        drop: tuple[str, ...] = ("variants", "calibration", "engines")
    else:
        for engine in out.glob("*.engine"):
            engine.unlink()
        drop = ("engines",)
    path = out / "manifest.json"
    if path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if any(k in manifest for k in drop):
            for k in drop:
                manifest.pop(k, None)
            update_manifest(out, manifest, [])


def _summary(stage: str, result: Any) -> str:
    """One line for build_state.json and the report."""
    if stage == "train":
        v = result.metrics["val"]
        return f"val accuracy {v['accuracy']:.1%}, best: {best_label(result.result.best_epoch)}"
    if stage == "export":
        return f"parity max |logit diff| {result.parity.max_abs_logit_diff:.1e}"
    if stage == "quantize":
        return ", ".join(f"{k} {r.status} ({r.drop_points:+.2f} pts)" for k, r in result.items())
    if stage == "build":
        return result.get("reason", "") if result.get("status") != "built" else "engines built"
    if stage == "bench":
        return f"{len(result['results'])} measurements, {len(result['skipped'])} skipped"
    failed = sum(g.failed for g in result)
    return f"{len(result) - failed} of {len(result)} gates passed"


def _call(stage: str, recipe: Recipe, console: Console, resume: bool) -> Any:
    funcs = {
        "export": export_stage,
        "quantize": quantize_stage,
        "build": engines_stage,
        "bench": bench_stage,
        "report": report_stage,
    }
    if stage == "train":
        return train_stage(recipe, console, resume=resume)
    return funcs[stage](recipe, console)


class _Machine:
    """The machine key for build/bench stage inputs, computed once per command (it runs
    nvidia-smi and imports torch) and only if such a stage is looked at."""

    def __init__(self) -> None:
        self._key: dict[str, Any] | None = None

    def __call__(self, stage: StageDef) -> dict[str, Any] | None:
        if not stage.machine:
            return None
        if self._key is None:
            from tlbuild.bench.environment import environment, machine_key

            self._key = machine_key(environment())
        return self._key


def _build(
    state: BuildState,
    st: StageDef,
    inputs: dict[str, Any],
    recipe: Recipe,
    console: Console,
    resume: bool,
) -> tuple[Any, float]:
    """Run one stage and record it: forgotten first, so a kill leaves it stale."""
    state.start(st.name)
    t0 = time.perf_counter()
    result = _call(st.name, recipe, console, resume)
    seconds = time.perf_counter() - t0
    state.finish(st, inputs, seconds, _summary(st.name, result))
    return result, seconds


def run_stage(recipe: Recipe, console: Console, stage: str, resume: bool = False) -> Any:
    """Run one stage unconditionally (the single-stage commands) and record it as built."""
    st = next(s for s in STAGES if s.name == stage)
    state = BuildState(recipe.out_dir)
    inputs = state.inputs(st, recipe, _Machine()(st))
    return _build(state, st, inputs, recipe, console, resume)[0]


def stage_status(recipe: Recipe) -> list[StageOutcome]:
    """Fresh or stale per stage, and why; runs nothing."""
    state = BuildState(recipe.out_dir)
    machine = _Machine()
    rows = []
    for st in STAGES:
        if not _enabled(recipe, st.name):
            rows.append(StageOutcome(st.name, "disabled", ["no variants in the recipe"]))
            state.stages.pop(st.name, None)  # as `run` will: later stages then show stale
            continue
        fresh, why = state.check(st, state.inputs(st, recipe, machine(st)))
        rows.append(StageOutcome(st.name, "fresh" if fresh else "stale", why))
    return rows


def run(
    recipe: Recipe, console: Console, resume: bool = False, force: tuple[str, ...] = ()
) -> RunResult:
    """The whole build, redoing only the stages whose inputs changed (or `force`d ones)."""
    unknown = set(force) - {*STAGE_NAMES, "all"}
    if unknown:
        raise UsageError(
            f"--force {', '.join(sorted(unknown))}: not a stage; use {', '.join(STAGE_NAMES)} "
            "or all"
        )
    out = recipe.out_dir
    _remove_leftovers(out)
    state = BuildState(out)
    machine = _Machine()
    outcomes: list[StageOutcome] = []
    for st in STAGES:
        if not _enabled(recipe, st.name):
            _disable(out, st.name)  # idempotent; also cleans up after a killed run
            state.start(st.name)  # later stages see the change (their inputs hash it)
            outcomes.append(StageOutcome(st.name, "disabled", ["no variants in the recipe"]))
            continue
        inputs = state.inputs(st, recipe, machine(st))
        fresh, why = state.check(st, inputs)
        if st.name in force or "all" in force:
            fresh, why = False, ["forced with --force"]
        if fresh:
            console.print(f"[green]✓[/] {st.name}: up to date, reused")
            outcomes.append(StageOutcome(st.name, "reused", []))
            continue
        console.rule(f"[bold]{st.name}[/] — {escape('; '.join(why))}", align="left", style="dim")
        _, seconds = _build(state, st, inputs, recipe, console, resume)
        outcomes.append(StageOutcome(st.name, "ran", why, seconds))
    # Gates are checked on every run, reused stages or not: CI must fail while they fail.
    gates = evaluate_gates(recipe.gates, out)
    return RunResult(out, outcomes, gates)
