"""The `tlbuild` command line: parse, call the runner or a stage, render. No build logic here."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tlbuild import __version__
from tlbuild.classify.options import ClassifyOptions, RayOptions, help_of
from tlbuild.errors import TlbuildError, disk_full

app = typer.Typer(
    help="Build edge image classifiers from a TOML recipe: fine-tune, export, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Dataset helpers.", no_args_is_help=True)
app.add_typer(data_app, name="data")

T = TypeVar("T")
RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file (keys: docs/recipe.md).")]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


_KEPT = "files finished before are kept; run the same command to go on."
_RESUME_HINT = "finished files are kept. `--resume` continues training."


def _guard(
    fn: Callable[[], T],
    kept: str | Callable[[], str] = _KEPT,
    on_error: Callable[[str], None] | None = None,
) -> T:
    """Run `fn`, turning user-facing errors into one message and the documented exit code.

    `kept` says what an interrupted (Ctrl-C, SIGTERM) or disk-full run kept; a callable is asked
    only then, so the message can say what is really on disk at that moment. `on_error` is
    given that message before the exit (a --junit file records it).
    """
    err = Console(stderr=True, highlight=False)

    def said() -> str:
        return kept() if callable(kept) else kept

    def stop(message: str, code: int) -> typer.Exit:
        if on_error is not None:
            on_error(message)
        return typer.Exit(code)

    try:
        return fn()
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]; {escape(said())}")
        raise stop(f"interrupted; {said()}", 130) from None
    except Exception as e:
        # A full disk, however deep a library wrapped it, is one message and what was kept.
        full = disk_full(e)
        if full is not None:
            err.print(f"[bold red]error:[/] {escape(full)}; {escape(said())}", soft_wrap=True)
            raise stop(f"{full}; {said()}", 1) from None
        if not isinstance(e, TlbuildError):
            if on_error is not None:  # a bug or a library's failure: CI still gets its report
                on_error(f"unexpected {type(e).__name__}: {e}")
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
        raise stop(str(e), e.exit_code) from None


JunitOption = Annotated[
    Path | None,
    typer.Option(
        help="Also write the gates as JUnit XML to this file (GitLab, Jenkins and GitHub "
        "test reports); a run that stops with an error writes it as one failed test.",
        show_default=False,
    ),
]


def _writable_file(path: Path, option: str) -> None:
    from tlbuild.errors import UsageError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot create its folder ({e.strerror})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UsageError(f"{option} {path}: not a file that can be written here")


class _CiOutputs:
    """Where one command's gates go besides the terminal: --junit, and the GitHub Actions job
    summary where $GITHUB_STEP_SUMMARY is set."""

    def __init__(self, junit: Path | None, suite: str) -> None:
        self.junit, self.suite, self.started = junit, suite, time.perf_counter()
        if junit is not None:  # said now, not after a build of an hour
            _guard(lambda: _writable_file(junit, "--junit"))

    def failed(self, message: str) -> None:
        """The command stopped before its gates were judged."""
        from tlbuild.ci.junit import write_junit

        if self.junit is not None:
            write_junit(self.junit, self.suite, [], self.started, error=message)

    def gates(self, gates: list, properties: dict[str, str], headline: list[list[str]]) -> None:  # noqa: ANN001
        """The gates as judged (GateResult list), with the figures a CI page should show."""
        from tlbuild.ci.github import append_step_summary, summary_markdown
        from tlbuild.ci.junit import write_junit

        if self.junit is not None:
            write_junit(self.junit, self.suite, gates, self.started, properties=properties)
        append_step_summary(summary_markdown(f"tlbuild {self.suite}", gates, headline))


def _load(recipe: Path):  # noqa: ANN202 - Recipe, imported lazily to keep --help fast
    from tlbuild.recipe import load_recipe

    return load_recipe(recipe)


NprocOption = Annotated[
    int | None,
    typer.Option(
        "--nproc-per-node",
        help="Train in N processes on this machine under torchrun, one per GPU (gloo on CPU); "
        "train.batch_size stays the global batch. Several machines: run torchrun yourself "
        "(docs/distributed.md).",
        show_default=False,
    ),
]


def _train_launcher(recipe: Path, resume: bool, nproc: int | None):  # noqa: ANN202
    """For --nproc-per-node N > 1: a runner.Launcher that runs `tlbuild train RECIPE` (the
    train command minus the option) in N processes under torchrun.

    Checked before anything starts; None without the option, or with N = 1 (this process
    trains, as without it).
    """
    if nproc is None:
        return None
    from tlbuild.train import distributed

    train = _load(recipe).train
    distributed.check_launch(train.batch_size, train.device, nproc)
    if nproc == 1:
        return None
    args = ["train", str(recipe.resolve()), *(["--resume"] if resume else [])]
    return lambda stage=None: distributed.launch(args, nproc)


def _leave_process_group() -> None:
    from tlbuild.train import distributed

    distributed.leave()


@app.command()
def run(
    recipe: RecipeArg,
    resume: Annotated[
        bool, typer.Option(help="Continue training from the last checkpoint.")
    ] = False,
    force: Annotated[
        list[str] | None,
        typer.Option(
            help="Rerun a stage even if fresh (repeatable): train, export, quantize, engines, "
            "bench, report, or all."
        ),
    ] = None,
    nproc_per_node: NprocOption = None,
    junit: JunitOption = None,
) -> None:
    """The whole build for RECIPE, redoing only what changed; exit 1 if a gate fails."""
    from tlbuild import runner
    from tlbuild.train.distributed import is_main_process

    console = _console()
    t0 = time.perf_counter()
    if not is_main_process():
        # Another torchrun process: it trains when rank 0 says so and builds nothing else.
        try:
            _guard(lambda: runner.follow(_load(recipe), console, resume=resume), _RESUME_HINT)
        finally:
            _leave_process_group()
        return
    # With --nproc-per-node only the train stage runs in several processes: the runner hands
    # it, when stale, to `tlbuild train` under torchrun (whose rank 0 records it) and goes on
    # alone. Export, quantization and benchmarks are single-process work; this way the
    # children exit when training ends instead of idling through them holding GPUs.
    ci = _CiOutputs(junit, f"run {recipe.stem}")
    try:
        result = _guard(
            lambda: runner.run(
                _load(recipe),
                console,
                resume=resume,
                force=tuple(force or ()),
                launch=_train_launcher(recipe, resume, nproc_per_node),
            ),
            _RESUME_HINT,
            ci.failed,
        )
    finally:
        _leave_process_group()
    reused = [s.stage for s in result.stages if s.action == "reused"]
    ran = [s.stage for s in result.stages if s.action == "ran"]
    total = time.perf_counter() - t0
    _print_stage_times(console, result.stages, total)
    console.print(
        f"[bold]Build done[/] in {total:.1f}s: {result.out} "
        f"(ran: {', '.join(ran) or 'nothing'}; reused: {', '.join(reused) or 'nothing'})"
    )
    _print_fine_tuning_gain(console, result.out)
    from tlbuild.ci.headline import build_headline

    props = {"export_folder": str(result.out), "ran": ",".join(ran)}
    ci.gates(result.gates, props, build_headline(result.out))
    _gate_verdict(console, result.gates)


def _print_stage_times(console: Console, stages: list, total: float) -> None:  # noqa: ANN001
    """Where this run's minutes went: each stage that ran, its seconds and share."""
    from rich.table import Table

    ran = [s for s in stages if s.action == "ran"]
    if not ran:
        return
    table = Table(title="Time per stage", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for s in sorted(ran, key=lambda s: -s.seconds):
        table.add_row(s.stage, f"{s.seconds:.1f}", f"{s.seconds / max(total, 1e-9):.0%}")
    console.print(table)


def _print_fine_tuning_gain(console: Console, out: Path) -> None:
    """What fine-tuning bought over the head alone (issue: users should see it at the end)."""
    from tlbuild.fileio import read_json_or_empty
    from tlbuild.train.metrics import fine_tuning_gain

    line = fine_tuning_gain(read_json_or_empty(out / "metrics.json"))
    if line:
        console.print(f"[bold]{escape(line)}[/]")


def _gate_verdict(console: Console, gates: list) -> None:  # noqa: ANN001 - GateResult list
    """Print every gate; exit 1 naming each failed one with its threshold and measured value."""
    if not gates:
        return
    failed = [g for g in gates if g.failed]
    for g in gates:
        mark = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]"}.get(g.status, "[dim]n/a[/]")
        console.print(f"  gate {mark}  {escape(g.describe())}")
    if failed:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(
            f"[bold red]error:[/] {len(failed)} gate(s) failed: "
            + escape("; ".join(g.describe() for g in failed))
        )
        raise typer.Exit(1)
    console.print(f"[bold green]All {len(gates)} gates passed[/]")


@app.command()
def status(recipe: RecipeArg) -> None:
    """Fresh or stale, per stage, and why; builds nothing."""
    from tlbuild import runner

    rows = _guard(lambda: runner.stage_status(_load(recipe)))
    table = Table("stage", "state", "why")
    for r in rows:
        colour = {"fresh": "green", "stale": "yellow"}.get(r.action, "dim")
        table.add_row(r.stage, f"[{colour}]{r.action}[/]", escape("; ".join(r.why)))
    _console().print(table)


def _stage_command(stage: str, recipe: Path, resume: bool = False) -> None:
    from tlbuild import runner

    console = _console()
    kept = _RESUME_HINT if stage == "train" else _KEPT
    _guard(lambda: runner.run_one(_load(recipe), console, stage, resume=resume), kept)


@app.command()
def train(
    recipe: RecipeArg,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    nproc_per_node: NprocOption = None,
) -> None:
    """Fine-tune the recipe's backbone; writes model.pt, metrics and plots."""

    def go() -> None:
        from tlbuild.folder_lock import folder_lock

        launch = _train_launcher(recipe, resume, nproc_per_node)
        if launch is not None:
            # Held here, so a busy folder is refused before N processes start; they inherit it.
            with folder_lock(_load(recipe).out_dir):
                launch()  # rank 0 of the N processes records the stage and writes
        else:
            _stage_command("train", recipe, resume)

    try:
        _guard(go, _RESUME_HINT)
    finally:
        _leave_process_group()


@app.command()
def export(recipe: RecipeArg) -> None:
    """Export the trained model to ONNX and check it against PyTorch."""
    _stage_command("export", recipe)


@app.command()
def quantize(recipe: RecipeArg) -> None:
    """Make the FP16 / INT8 variants of model.onnx and gate them on the validation split."""
    _stage_command("quantize", recipe)


@app.command()
def build(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe TOML file.")] = None,
    on_device: Annotated[
        Path | None,
        typer.Option(help="Build from an exported folder alone, on the target machine."),
    ] = None,
) -> None:
    """Compile TensorRT engines from the accepted ONNX variants (skipped without TensorRT)."""
    from tlbuild.errors import UsageError

    console = _console()

    def go() -> None:
        from tlbuild.export.engines import make_engines, settings_for_folder
        from tlbuild.folder_lock import folder_lock

        if (recipe is None) == (on_device is None):
            raise UsageError("give either RECIPE or --on-device DIR")
        if recipe is not None:
            return _stage_command("engines", recipe)
        if not (on_device / "manifest.json").is_file():
            raise UsageError(f"{on_device} has no manifest.json; copy the whole export folder")
        cfg, max_drop, source = settings_for_folder(on_device)
        console.print("[dim]" + escape(f"Settings [build] {source}") + "[/]")
        with folder_lock(on_device):
            make_engines(on_device, cfg, max_drop, console, None)

    _guard(go)


@app.command()
def bench(
    target: Annotated[
        Path, typer.Argument(help="Recipe TOML file, or an export folder (e.g. on a device).")
    ],
    junit: JunitOption = None,
) -> None:
    """Latency p50/p90/p99, throughput, accuracy and size of every artifact this machine runs;
    exit 1 if one of the recipe's speed or accuracy gates fails here."""
    from tlbuild.errors import UsageError

    console = _console()
    ci = _CiOutputs(junit, f"bench {target.stem or target.name}")

    def go():  # noqa: ANN202 - (export folder, its [gates])
        from tlbuild.bench.folder_settings import (
            gates_for_folder,
            settings_for_folder,
            validation_if_here,
        )
        from tlbuild.bench.run import bench_folder
        from tlbuild.folder_lock import folder_lock
        from tlbuild.manifest import read_manifest

        if not target.exists():
            raise UsageError(f"{target}: no such recipe file or export folder")
        if not target.is_dir():
            from tlbuild import runner  # the whole build's stages: not needed on a device

            r = _load(target)
            runner.run_one(r, console, "bench")
            return r.out_dir, r.gates
        read_manifest(target)  # a clear message for a folder that is not an export
        cfg, source = settings_for_folder(target)
        console.print("[dim]" + escape(f"Settings [bench] {source}") + "[/]")
        # On a device the validation images are usually absent: latency only, no accuracy.
        with folder_lock(target):
            bench_folder(target, cfg, console, validation_if_here(target))
        return target, gates_for_folder(target)

    folder, cfg = _guard(go, on_error=ci.failed)
    from tlbuild.ci.headline import bench_headline
    from tlbuild.gates import bench_gates

    gates = bench_gates(cfg, folder)
    ci.gates(gates, {"export_folder": str(folder)}, bench_headline(folder))
    _gate_verdict(console, gates)


# classify's options: their defaults and help are the options types' own (classify/options.py).
_CO, _RO = ClassifyOptions(), RayOptions()


def _co(name: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_of(ClassifyOptions, name))


def _ro(name: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_of(RayOptions, name))


@app.command()
def classify(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders (recursive), image files, or text files of paths (.txt/.lst, '-' "
            "for stdin); local paths or s3:// / gs:// URLs.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="Export folder (best artifact for this machine) or an artifact; a local path "
            "or an s3:// / gs:// URL (fetched once per machine, sha256 checked).",
            show_default=False,
        ),
    ] = "",
    out: Annotated[
        str,
        typer.Option(
            help="Parquet results file, or a folder ending in '/' (local or s3:// / gs://) for "
            "a dataset of part files; resumed if it exists.",
            show_default=False,
        ),
    ] = "",
    artifact: Annotated[str | None, _co("artifact")] = _CO.artifact,
    provider: Annotated[str, _co("provider")] = _CO.provider,
    batch_size: Annotated[int, _co("batch_size")] = _CO.batch_size,
    workers: Annotated[int, _co("workers")] = _CO.workers,
    topk: Annotated[int, _co("topk")] = _CO.topk,
    ok_class: Annotated[str | None, _co("ok_class")] = _CO.ok_class,
    threshold: Annotated[float | None, _co("threshold")] = _CO.threshold,
    novelty: Annotated[str, _co("novelty")] = _CO.novelty,
    # The command line takes the extensions as one comma-separated string ('' = all).
    ext: Annotated[str, _co("extensions")] = "",
    exact_decode: Annotated[bool, _co("exact_decode")] = _CO.exact_decode,
    overwrite: Annotated[bool, _co("overwrite")] = _CO.overwrite,
    retry_errors: Annotated[bool, _co("retry_errors")] = _CO.retry_errors,
    max_error_rate: Annotated[float | None, _co("max_error_rate")] = _CO.max_error_rate,
    engine: Annotated[str, _co("engine")] = _CO.engine,
    ray_address: Annotated[str | None, _ro("address")] = _RO.address,
    actors: Annotated[int | None, _ro("actors")] = _RO.actors,
    cpus_per_actor: Annotated[float, _ro("cpus_per_actor")] = _RO.cpus_per_actor,
    gpus_per_actor: Annotated[float, _ro("gpus_per_actor")] = _RO.gpus_per_actor,
    model_cache: Annotated[Path | None, _co("model_cache")] = _CO.model_cache,
    part_rows: Annotated[int, _co("part_rows")] = _CO.part_rows,
    compact: Annotated[bool, _co("compact")] = _CO.compact,
    junit: JunitOption = None,
) -> None:
    """Classify image folders into a Parquet file: streaming, resumable, bad files kept as rows."""
    import signal

    from tlbuild.classify.inputs import parse_extensions
    from tlbuild.classify.run import Kept
    from tlbuild.classify.terminal import classify_with_progress, print_summary
    from tlbuild.errors import UsageError

    console = _console()
    ray = RayOptions(ray_address, actors, cpus_per_actor, gpus_per_actor)
    kept = Kept()

    def said() -> str:
        # Asked only once the run has stopped, so it says what is on disk then.
        return f"{kept()}. Run the same command to go on."

    # Ray settings with the local engine are a mistake worth saying, not ignoring.
    ray_given = ray != RayOptions() or ray_address is not None

    def go():  # noqa: ANN202
        if not model or not out:
            raise UsageError("name the model and the results: --model DIR --out FILE.parquet")
        options = ClassifyOptions(
            artifact=artifact,
            provider=provider,
            batch_size=batch_size,
            workers=workers,
            topk=topk,
            ok_class=ok_class,
            threshold=threshold,
            novelty=novelty,
            exact_decode=exact_decode,
            extensions=parse_extensions(ext),
            overwrite=overwrite,
            retry_errors=retry_errors,
            max_error_rate=max_error_rate,
            engine=engine,
            ray=ray if engine == "ray" or ray_given else None,
            model_cache=model_cache,
            part_rows=part_rows,
            compact=compact,
        )
        return classify_with_progress(inputs or [], model, out, options, console, kept)

    # A scheduler stopping the job (SIGTERM) gets the same clean stop as Ctrl-C.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    ci = _CiOutputs(junit, "classify")
    try:
        summary = _guard(go, said, ci.failed)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(console, summary)
    gate = summary.error_rate_gate(max_error_rate)
    counts = {"results": str(summary.out), "rows": str(summary.rows), "errors": str(summary.errors)}
    from tlbuild.ci.headline import classify_headline

    ci.gates([gate] if gate else [], counts, classify_headline(summary))
    _guard(lambda: summary.check_error_rate(max_error_rate))


@app.command()
def cv(
    recipe: RecipeArg,
    folds: Annotated[
        int, typer.Option(help="Number of stratified folds (seeded by data.split.seed).")
    ] = 5,
    fresh: Annotated[
        bool, typer.Option(help="Retrain every fold instead of reusing finished ones.")
    ] = False,
) -> None:
    """Cross-validate RECIPE: spread across folds, out-of-fold scores, likely label errors."""
    from rich.table import Table

    from tlbuild.cv.report import write_cv_outputs
    from tlbuild.cv.run import CV_DIR, run_cv
    from tlbuild.folder_lock import folder_lock

    console = _console()

    def go():  # noqa: ANN202
        r = _load(recipe)
        # A build of the same recipe may run beside it (cv writes only under cv/), two cv not.
        with folder_lock(r.out_dir / CV_DIR):
            result = run_cv(r, folds, console, fresh=fresh)
            return result, write_cv_outputs(result)

    result, report = _guard(go, "finished folds are kept; run the same command to go on.")
    table = Table("metric", "mean", "std", "min", "max", title=f"{folds}-fold cross-validation")
    for key, s in result.summary.items():
        if isinstance(s, dict):
            table.add_row(key, *(f"{s[k]:.1%}" for k in ("mean", "std", "min", "max")))
    console.print(table)
    console.print(
        f"Likely label errors: {len(result.issues)} (thumbnails in {report}); every image's "
        f"out-of-fold scores in {report.parent / 'cv_oof.parquet'}"
    )


@app.command()
def check(recipe: RecipeArg) -> None:
    """Validate RECIPE and print it fully resolved (defaults filled, paths absolute)."""
    from tlbuild.preflight import check_recipe

    def go():  # noqa: ANN202 - Recipe, imported lazily
        r = _load(recipe)
        check_recipe(r)
        return r

    r = _guard(go)
    print(json.dumps({"output": str(r.out_dir), **r.to_jsonable()}, indent=2))
    note = _input_size_note(r)
    if note:
        Console(stderr=True, highlight=False).print(f"[yellow]note:[/] {escape(note)}")


def _input_size_note(r) -> str | None:  # noqa: ANN001 - Recipe, imported lazily
    """The input size the recipe will use, and advice when it is far above the images' size."""
    import timm

    from tlbuild.data.scan import list_class_folders
    from tlbuild.data.sizes import resolve_input_size, size_advice, summarize_sizes
    from tlbuild.errors import DataError

    folder = r.data.root if r.data.root is not None else r.data.train
    try:
        paths = [p for ps in list_class_folders(folder, r.data.extensions).values() for p in ps]
    except DataError:  # `check` validates the recipe; data problems are `run`'s to report
        return None
    images = summarize_sizes(paths)
    cfg = timm.models.get_pretrained_cfg(r.model.backbone)
    default = tuple(cfg.input_size[1:]) if cfg is not None else (224, 224)
    requested = r.model.preprocess.input_size
    size = resolve_input_size(requested, images, default)
    if requested == "auto":
        shown = f"{images.width}x{images.height}" if images else "unknown"
        return f'input_size = "auto": {size[0]} px for images of about {shown} px (median)'
    return size_advice(images, size, max(default))


@app.command()
def backbones(
    all_models: Annotated[
        bool, typer.Option("--all", help="List every timm classification model.")
    ] = False,
    pattern: Annotated[str, typer.Option(help="Filter names, e.g. '*mobilenet*'.")] = "",
) -> None:
    """List backbones and whether ImageNet weights are available offline."""
    import timm

    from tlbuild.models.factory import RECOMMENDED, offline_weights

    names = timm.list_models(pattern or "*") if all_models or pattern else list(RECOMMENDED)
    table = Table("backbone", "input", "offline weights")
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        size = "x".join(str(s) for s in cfg.input_size[1:]) if cfg is not None else "?"
        table.add_row(name, size, offline_weights(name) or "-")
    _console().print(table)


@app.command()
def explain(
    images: Annotated[
        list[str],
        typer.Argument(metavar="IMAGE", help="Image files, folders (recursive) or path lists."),
    ],
    model: Annotated[
        Path, typer.Option(help="Export folder with model.pt (Grad-CAM needs PyTorch).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and heatmaps.parquet.")] = Path(
        "heatmaps"
    ),
    max_images: Annotated[int, typer.Option(min=1, help="Explain at most this many.")] = 64,
    topk: Annotated[int, typer.Option(min=1, help="Classes per row in topk_*.")] = 3,
    grid: Annotated[bool, typer.Option(help="Also write grid.png with every overlay.")] = False,
) -> None:
    """Grad-CAM heat maps: one PNG per image and a Parquet row each (label, score, top-k)."""
    from tlbuild.explain.images import explain_images

    console = _console()
    r = _guard(lambda: explain_images(images, model, out, console, max_images, topk, grid))
    for path, reason in r.errors:
        console.print(f"[yellow]not explained:[/] {escape(path)}: {escape(reason)}")
    left = f" (the first {max_images}; --max-images)" if r.found > max_images else ""
    console.print(
        f"{r.explained} of {r.found} image(s) explained{left}: PNGs in {r.out}, "
        f"one row per image in {r.parquet}" + (f", grid {r.grid}" if r.grid else "")
    )


@app.command()
def select(
    results: Annotated[str, typer.Argument(help="Results of `tlbuild classify` (file or folder).")],
    model: Annotated[Path, typer.Option(help="The export folder that classified them.")],
    n: Annotated[int, typer.Option(min=1, help="How many images to pick.")] = 50,
    out: Annotated[
        Path, typer.Option(help="New folder: selection.csv and images/ for a labeller.")
    ] = Path("to-label"),
    copy: Annotated[bool, typer.Option(help="Copy the images instead of linking them.")] = False,
) -> None:
    """The images most worth labelling next: flagged, then nearest the decision, spread out."""
    from tlbuild.classify.select import SELECTION_CSV
    from tlbuild.classify.select import select as pick

    console = _console()
    picks = _guard(lambda: pick(results, model, n, out, copy))
    flagged = sum(1 for c in picks if c.tier == 0)
    console.print(
        f"{len(picks)} image(s) picked ({flagged} flagged as novel, {len(picks) - flagged} "
        f"nearest the decision): {out / SELECTION_CSV}, and {out / 'images'}/ "
        + ("(copies)" if copy else "(links)")
    )


@app.command("verify-client")
def verify_client(
    results: Annotated[
        Path,
        typer.Argument(
            help="Your client's RESULTS.csv on the kit's images (conformance/README.md)."
        ),
    ],
    kit: Annotated[
        Path, typer.Option(help="The conformance kit: an export folder or its conformance/.")
    ] = Path("."),
) -> None:
    """Check a client's outputs against the conformance kit; name the step that differs."""
    from tlbuild.clients.verify import verify

    console = _console()
    report = _guard(lambda: verify(results, kit))
    for r in report.rows:
        if r.ok:
            continue
        console.print(
            f"[red]differs[/] {escape(r.image)} on {escape(r.artifact)} (line {r.line}): "
            f"[bold]{r.step}[/] step: {escape(r.why)}",
            soft_wrap=True,
        )
    passed = sum(r.ok for r in report.rows)
    steps = sorted({s for r in report.rows for s in r.checked})
    console.print(
        f"{passed} of {len(report.rows)} rows conform "
        f"(steps compared: {', '.join(steps) or 'none'})"
    )
    if report.unchecked:
        shown = ", ".join(report.unchecked[:6]) + (" ..." if len(report.unchecked) > 6 else "")
        console.print(
            f"[red]no row for[/] {len(report.unchecked)} image(s) of the kit: {escape(shown)}"
        )
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("synth-defects")
def synth_defects(
    out: Annotated[Path, typer.Argument(help="Output folder (class sub-folders are created).")],
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 150,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 160,
    seed: Annotated[int, typer.Option(help="Seed; same seed, same files.")] = 0,
) -> None:
    """Write the deterministic surface-inspection demo dataset (ok / scratch / spot / crack)."""
    from rich.progress import Progress

    from tlbuild.data.synth import CLASSES
    from tlbuild.data.synth import synth_defects as make

    console = _console()

    def go() -> dict[str, int]:
        try:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("Generating", total=per_class * len(CLASSES))
                return make(out, per_class, size, seed, lambda: progress.advance(task))
        except ValueError as e:
            from tlbuild.errors import UsageError

            raise UsageError(str(e)) from None

    counts = _guard(go)
    console.print(f"Wrote {sum(counts.values())} images to {out}: {counts}")


def _version(value: bool) -> None:
    if value:
        print(f"tlbuild {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Build edge image classifiers from a TOML recipe."""
    import warnings

    # A recipe key's old name is a one-line notice naming the recipe line, not Python's warning
    # format with the source line echoed under it.
    warnings.formatwarning = _one_line_warning


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    kind = "notice" if issubclass(category, FutureWarning) else category.__name__
    return f"{filename}:{lineno}: {kind}: {message}\n"


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
