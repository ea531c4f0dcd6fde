"""The bench stage: latency, throughput, accuracy and size of every artifact this machine runs.

Timing is host to host: the batch goes in as a NumPy array and the logits come back as one, so
every backend has finished (and, on a GPU, synchronised its stream: torch's copy to host, ORT's
output fetch, TensorRT's stream.synchronize()) before the clock stops; torch on CUDA is also
synchronised explicitly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tlbuild.artifacts import MODEL_ONNX, MODEL_PT, VARIANTS, onnx_artifact
from tlbuild.bench.environment import cpu_cores, environment
from tlbuild.bench.timing import Precision, measure, ort_profile_check
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.data.scan import Sample
from tlbuild.errors import BuildError, UsageError
from tlbuild.fileio import write_json, write_parquet
from tlbuild.manifest import Manifest, read_manifest
from tlbuild.recipe import BenchConfig
from tlbuild.runtime.backends import images_logits
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.load import load_predictor
from tlbuild.runtime.providers import ORT_PROVIDERS, provider_problem, providers_that_start
from tlbuild.runtime.tensorrt import tensorrt_status

BENCH_JSON = "bench.json"
BENCH_PARQUET = "bench.parquet"


@dataclass(frozen=True)
class Target:
    """One artifact on one backend."""

    artifact: str
    provider: str  # cpu / cuda / tensorrt (load_predictor's names)


def targets(folder: Path, manifest: Manifest) -> tuple[list[Target], list[dict[str, str]]]:
    """What this machine can benchmark, and what it skips with the reason."""
    import onnxruntime as ort

    problems: dict[str, str | None] = {}

    def problem(provider: str) -> str | None:  # opened once, and only for a file that needs it
        if provider not in problems:
            problems[provider] = provider_problem(provider)
        return problems[provider]

    found: list[Target] = []
    skipped: list[dict[str, str]] = []

    def skip(name: str, reason: str) -> None:
        skipped.append({"artifact": name, "reason": reason, "kind": "not here"})

    if (folder / MODEL_PT).is_file():
        try:  # a device usually runs without PyTorch: model.pt is then not benchmarked
            import torch
        except ImportError:
            skip(MODEL_PT, "PyTorch is not installed here")
        else:
            found.append(Target(MODEL_PT, "cpu"))
            if torch.cuda.is_available():
                found.append(Target(MODEL_PT, "cuda"))
    if (folder / MODEL_ONNX).is_file():
        found.append(Target(MODEL_ONNX, "cpu"))
        if problem("cuda") is None:
            found.append(Target(MODEL_ONNX, "cuda"))
    for a in VARIANTS.values():
        if (folder / a.rejected_file).is_file():
            skip(a.rejected_file, "rejected by the accuracy gate")
        if not (folder / a.file).is_file():
            continue
        if not manifest.accepted(a.file):
            skip(a.file, "rejected by the accuracy gate (or not in the manifest)")
        elif (why := problem(a.provider)) is None:
            found.append(Target(a.file, a.provider))
        else:
            # Why it did not start, where this onnxruntime has the provider at all.
            listed = ORT_PROVIDERS[a.provider] in ort.get_available_providers()
            skip(a.file, a.not_here + (f" ({why})" if listed else ""))
    for name, r in manifest.image_models.items():
        a = onnx_artifact(name)
        if not r.get("file") or not (folder / name).is_file() or a is None:
            continue
        if (why := problem(a.provider)) is None:
            found.append(Target(name, a.provider))
        else:
            skip(name, a.not_here or why)
    engines = sorted(folder.glob("*.engine"))
    if engines:
        ok, why = tensorrt_status()
        for e in engines:
            if not manifest.accepted(e.name):
                skip(e.name, "rejected by the accuracy gate (or not in the manifest)")
            elif ok:
                found.append(Target(e.name, "tensorrt"))
            else:
                skip(e.name, why)
    return found, skipped


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    try:
        import torch
    except ImportError:  # nothing to limit
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs(spec: Preprocessing, val: Sequence[Sample] | None, batch: int) -> np.ndarray:
    """A batch of real validation images (repeated if there are fewer), else seeded noise."""
    if val:
        picked = [val[i % len(val)].path for i in range(min(batch, len(val)))]
        x = load_batch(picked, spec)
        reps = -(-batch // len(x))
        return np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    h, w = spec.input_size
    return np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)


def _accuracy(
    predictors: dict[Target, Predictor], val: Sequence[Sample], spec: Preprocessing
) -> dict[Target, float]:
    """Top-1 accuracy of each predictor on the validation split, decoding each chunk once; an
    image model is fed each file's decoded pixels at its own size."""
    correct: dict[Target, int | None] = dict.fromkeys(predictors, 0)
    takes_images = any(p.takes_images for p in predictors.values())
    for i in range(0, len(val), 8):  # 8: inside any engine's batch range
        chunk = val[i : i + 8]
        x = load_batch([s.path for s in chunk], spec)
        pixels = [np.asarray(load_rgb(s.path)) for s in chunk] if takes_images else []
        y = np.array([s.label for s in chunk])
        for t, p in predictors.items():
            if correct[t] is None:
                continue
            try:
                logits = images_logits(p, pixels, False)[0] if p.takes_images else p.logits(x)
                correct[t] += int((logits.argmax(1) == y).sum())  # type: ignore[operator]
            except Exception:
                correct[t] = None  # reported without accuracy; its latency rows say more
    return {t: c / len(val) for t, c in correct.items() if c is not None}


def _image_inputs(val: Sequence[Sample] | None, batch: int) -> np.ndarray:
    """A batch of decoded validation images at their own size (the most common one), for an
    image model; a 640x480 grey frame where there are none."""
    if not val:
        return np.full((batch, 480, 640, 3), 128, np.uint8)
    pixels = [np.asarray(load_rgb(s.path)) for s in val[: max(batch, 32)]]
    shapes = [p.shape for p in pixels]
    common = max(set(shapes), key=shapes.count)
    same = [p for p in pixels if p.shape == common]
    return np.stack([same[i % len(same)] for i in range(batch)])


def _sync(p: Predictor) -> None:
    if p.backend == "torch:cuda":
        import torch

        torch.cuda.synchronize()


def _load_predictors(
    folder: Path, found: list[Target], threads: int, skipped: list[dict[str, str]]
) -> dict[Target, Predictor]:
    """Open every target; one that cannot run here (a GPU provider whose libraries are missing)
    is skipped with the reason, not fatal."""
    predictors: dict[Target, Predictor] = {}
    for t in found:
        try:
            predictors[t] = load_predictor(folder, t.artifact, t.provider, threads=threads)
        except Exception as e:
            skipped.append(
                {"artifact": t.artifact, "reason": f"cannot load: {e}", "kind": "failed"}
            )
    return predictors


def _measure_one(
    t: Target, p: Predictor, batch: int, x: np.ndarray, cfg: BenchConfig
) -> dict[str, Any] | dict[str, str]:
    """Latency row of one artifact at one batch size, or a skipped entry saying why not."""
    if not p.supports_batch(batch):
        reason = f"batch {batch} is outside the engine's profile"
        return {"artifact": t.artifact, "reason": reason, "kind": "not here"}

    def call() -> None:
        p.logits(x)
        _sync(p)

    precision = Precision(cfg.p50_precision_pct, cfg.p99_precision_pct)
    try:
        lat = measure(
            call, cfg.warmup_iters, cfg.min_iters, cfg.min_seconds, cfg.max_seconds, precision
        )
    except Exception as e:
        return {"artifact": t.artifact, "reason": f"batch {batch}: {e}", "kind": "failed"}
    return {
        "artifact": t.artifact,
        "backend": p.backend,
        "precision": p.precision,
        "batch": batch,
        **lat.summary(batch),
    }


def _timer_checks(
    folder: Path,
    predictors: dict[Target, Predictor],
    inputs: dict[int, np.ndarray],
    threads: int,
    console: Console,
) -> list[dict[str, Any]]:
    """Our timer against ONNX Runtime's profiler on each CPU ONNX artifact (a cross-check)."""
    checks: list[dict[str, Any]] = []
    # At the smallest batch only: there the binding's own cost is the largest share of a call,
    # so it is the strictest test of the timer (at batch 32 the two agreed to 0.1-0.2%).
    x = inputs[min(inputs)]
    for t, p in predictors.items():
        if t.provider != "cpu" or not t.artifact.endswith(".onnx") or p.takes_images:
            continue
        try:
            checks.append(ort_profile_check(folder / t.artifact, x, threads))
        except Exception as e:  # a cross-check; never fatal
            console.print(f"[yellow]timer check {t.artifact}: {e}[/]")
    return checks


def bench_folder(
    folder: Path, cfg: BenchConfig, console: Console, val: Sequence[Sample] | None
) -> dict[str, Any]:
    """Benchmark every runnable artifact of an export folder; write bench.json and .parquet."""
    manifest = read_manifest(folder)
    spec = Preprocessing.from_dict(manifest.preprocessing)
    threads = cfg.threads or cpu_cores()
    found, skipped = targets(folder, manifest)
    if not found:
        raise UsageError(f"nothing in {folder} can run on this machine; run `tlbuild run` first")
    for s in skipped:
        console.print(f"[dim]bench: skipping {s['artifact']}: {s['reason']}[/]")
    val = [s for s in (val or []) if s.path.is_file()] or None
    rows: list[dict[str, Any]] = []
    with _torch_threads(threads):
        predictors = _load_predictors(folder, found, threads, skipped)
        acc = _accuracy(predictors, val, spec) if (cfg.accuracy and val) else {}
        inputs = {b: _inputs(spec, val, b) for b in cfg.batch_sizes}
        # An image model is timed at the smallest batch only, on decoded frames at their own
        # size: a station sends one frame at a time, and its graph's resize is what is new.
        first = min(cfg.batch_sizes)
        images = (
            {first: _image_inputs(val, first)}
            if any(p.takes_images for p in predictors.values())
            else {}
        )
        total = sum(len(images if p.takes_images else inputs) for p in predictors.values())
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("Benchmarking", total=total)
            for t, p in predictors.items():
                for b, x in (images if p.takes_images else inputs).items():
                    progress.update(task, description=f"Benchmarking {t.artifact} batch {b}")
                    row = _measure_one(t, p, b, x, cfg)
                    if "reason" in row:
                        skipped.append(row)
                    else:
                        size = (folder / t.artifact).stat().st_size
                        # What one call is fed: an image model takes frames at their size.
                        fed = "x".join(map(str, x.shape[1:])) + (
                            " uint8" if p.takes_images else " float32"
                        )
                        rows.append(
                            {**row, "accuracy": acc.get(t), "size_bytes": size, "threads": threads,
                             "input": fed}
                        )  # fmt: skip
                    progress.advance(task)
            checks = (
                _timer_checks(folder, predictors, inputs, threads, console)
                if cfg.timer_check
                else []
            )
    if not rows:
        reasons = "; ".join(f"{x['artifact']}: {x['reason']}" for x in skipped)
        raise BuildError(f"no artifact in {folder} could be benchmarked here: {reasons}")
    result = {
        "format": "tlbuild.bench/1",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {**environment(), "onnxruntime_providers_started": providers_that_start()},
        "settings": {**cfg.model_dump(), "threads": threads},
        "validation_images": len(val) if val else 0,
        "results": rows,
        "skipped": skipped,
        "timer_check": checks,
    }
    write_json(folder / BENCH_JSON, result)
    _write_parquet(folder / BENCH_PARQUET, result)
    print_bench(console, result)
    return result


def _write_parquet(path: Path, result: dict[str, Any]) -> None:
    import pandas as pd

    df = pd.DataFrame(result["results"])
    env = result["environment"]
    df["accuracy"] = df["accuracy"].astype("float64")
    df["cpu"] = env["cpu"]
    df["gpu"] = ", ".join(env["gpus"]) or None
    df["created"] = pd.Timestamp(result["created"])
    write_parquet(path, df)


def short_backend(backend: str) -> str:
    """'onnxruntime:CPUExecutionProvider' -> 'ort:CPU', for tables."""
    return backend.replace("onnxruntime:", "ort:").replace("ExecutionProvider", "")


BENCH_COLUMNS = (
    "artifact",
    "backend",
    "batch",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "mean ± sd ms",
    "img/s",
    "accuracy",
    "MB",
)


def bench_cells(r: dict[str, Any]) -> list[str]:
    """One benchmark row as text, in BENCH_COLUMNS order (the CLI table and report.md)."""
    return [
        r["artifact"],
        short_backend(r["backend"]),
        str(r["batch"]),
        f"{r['p50_ms']:.2f}",
        f"{r['p90_ms']:.2f}",
        f"{r['p99_ms']:.2f}",
        f"{r['mean_ms']:.2f} ± {r['std_ms']:.2f}",
        f"{r['throughput_ips']:.0f}",
        "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
        f"{r['size_bytes'] / 1e6:.1f}",
    ]


def print_bench(console: Console, result: dict[str, Any]) -> None:
    """The benchmark as a rich table."""
    env = result["environment"]
    title = f"Benchmark on {env['cpu']} ({env['cores']} cores"
    title += f", {', '.join(env['gpus'])})" if env["gpus"] else ")"
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(BENCH_COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for r in result["results"]:
        table.add_row(*bench_cells(r))
    # At least 132 columns even in an 80-column CI log: a wrapped latency table is unreadable.
    wide = Console(
        file=console.file,
        width=max(console.width, 132),
        quiet=console.quiet,
        highlight=False,
        no_color=console.no_color,
        force_terminal=console.is_terminal,
    )
    wide.print(table)
    for c in result["timer_check"]:
        console.print(
            f"[dim]timer check {c['artifact']} batch {c['batch']}: p50 {c['timer_p50_ms']:.2f} ms "
            f"vs ONNX Runtime profiler {c['ort_profiler_p50_ms']:.2f} ms "
            f"({c['diff_pct']:+.1f}%)[/]"
        )
