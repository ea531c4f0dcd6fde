"""Batch classification: lazy file discovery -> parallel decode -> batched inference -> Parquet.

Two engines share everything but the middle step: `local` decodes in threads and runs the model
in this process; `ray` (classify/ray_engine.py) runs decode and model in actors on a Ray cluster
and streams their rows back here. Either way this process is the only writer of `--out`.
"""

from __future__ import annotations

import importlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from tlbuild.artifacts import is_image_model
from tlbuild.classify.dataset_out import ResultsDataset, is_dataset_out
from tlbuild.classify.inputs import InputWalker, check_inputs
from tlbuild.classify.options import ClassifyOptions, ModelChoice, RayOptions
from tlbuild.classify.results import ResultsFile
from tlbuild.classify.rows import Decider, reason_kind
from tlbuild.classify.storage import default_model_cache, is_url, local_model
from tlbuild.decision.rule import manifest_threshold
from tlbuild.errors import BuildError, UsageError
from tlbuild.gates import GateResult
from tlbuild.manifest import Manifest, read_manifest
from tlbuild.novelty.drift import DriftCounter, image_block
from tlbuild.novelty.drift import warnings_for as drift_warnings
from tlbuild.novelty.score import NoveltyModel

# Re-exported: the options are what callers of classify() build.
__all__ = ["ClassifyOptions", "ClassifySummary", "Kept", "RayOptions", "classify"]

# Engine name -> "module:class". Imported on use: the Ray engine needs the `ray` extra, and
# the local one never imports Ray. Each has choose_model(source, local), rows(...) and close().
ENGINES = {
    "local": "tlbuild.classify.local_engine:LocalEngine",
    "ray": "tlbuild.classify.ray_engine:RayEngine",
}


class Engine(Protocol):
    """Where decode and inference run; this process writes what `rows` yields."""

    def choose_model(self, source: str, local: Path) -> ModelChoice: ...

    def rows(
        self, paths: Iterator[str], choice: ModelChoice, decider: Decider, sha256: str
    ) -> Iterator[dict[str, list[Any]]]: ...

    def close(self) -> None: ...


def open_engine(options: ClassifyOptions, warn: Callable[[str], None] | None) -> Engine:
    """The engine `options.engine` names, started."""
    module, name = ENGINES[options.engine].split(":")
    return getattr(importlib.import_module(module), name)(options, warn)


@dataclass
class ClassifySummary:
    """What one run did; rendered by the CLI."""

    out: str
    artifact: str
    backend: str
    rows: int = 0
    skipped: int = 0  # already in the results from an earlier run
    previous_rows: int = 0
    errors: int = 0
    defective: int = 0
    ok_class: str | None = None
    decision: str = ""  # which threshold decided and where it came from (or "": argmax)
    novelty: str = ""  # the novelty threshold in effect and where it came from (or "": none)
    novel: int = 0  # images flagged as unlike the training images
    drift: DriftCounter | None = None  # this run against validation's profile, where known
    drift_figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    labels: Counter[str] = field(default_factory=Counter)
    error_reasons: Counter[str] = field(default_factory=Counter)
    ignored_files: int = 0
    warnings: int = 0
    engine: str = "local"
    rule: str | None = None  # the defective rule the rows carry in decided_by
    parts: tuple[int, int] | None = None  # part files before and after --compact

    def count(self, cols: dict[str, Any]) -> None:
        """Add one batch of written rows to the totals."""
        errors = cols["error"]
        self.rows += len(errors)
        self.errors += sum(e is not None for e in errors)
        self.labels.update(lab for lab, e in zip(cols["label"], errors, strict=True) if e is None)
        self.error_reasons.update(reason_kind(e) for e in errors if e is not None)
        self.defective += sum(1 for d in cols["defective"] if d)
        self.novel += sum(1 for f in cols["novel"] if f)
        if self.drift is not None:
            self.drift.add(
                cols["label"],
                novelty=cols["novelty"],
                brightness=cols["brightness"],
                sharpness=cols["sharpness"],
            )

    @property
    def rate(self) -> float:
        """Images per second over the whole run."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def error_rate_gate(self, limit: float | None) -> GateResult | None:
        """--max-error-rate as a gate (JUnit, CI summaries); None where it was not given."""
        if limit is None:
            return None
        rate = self.errors / self.rows if self.rows else 0.0
        note = f"{self.errors} of {self.rows} inputs could not be classified"
        verdict = "failed" if rate > limit else "passed"
        return GateResult("max_error_rate", limit, rate, verdict, note)

    def check_error_rate(self, limit: float | None) -> None:
        """BuildError (exit 1) if more than `limit` (a fraction) of this run's inputs failed."""
        if limit is not None and self.rows and self.errors / self.rows > limit:
            raise BuildError(
                f"{self.errors} of {self.rows} inputs ({self.errors / self.rows:.1%}) could not "
                f"be classified, over --max-error-rate {limit:g}; their rows are in {self.out} "
                "with the reason in the 'error' column"
            )


def _resolve_ok_class(options: ClassifyOptions, manifest: Manifest, classes: list[str]):  # noqa: ANN202
    ok = options.ok_class or manifest.ok_class
    if ok is not None and ok not in classes:
        raise UsageError(f"--ok-class '{ok}' is not a class of this model ({', '.join(classes)})")
    if options.threshold is not None:
        if ok is None:
            raise UsageError("--threshold needs an ok class: pass --ok-class NAME")
        if not 0.0 < options.threshold <= 1.0:
            raise UsageError(f"--threshold {options.threshold:g} must be in (0, 1]")
    return ok


def _resolve_threshold(
    options: ClassifyOptions, manifest: Manifest, ok: str | None
) -> tuple[float | None, str]:
    """--threshold, else the one the manifest's [decision] chose; and a line saying which."""
    if options.threshold is not None:
        t = options.threshold
        return t, f"Decision threshold p({ok}) < {t:g} from --threshold"
    return manifest_threshold(manifest, ok)


def _resolve_novelty(
    options: ClassifyOptions, manifest: Manifest, folder: Path
) -> tuple[NoveltyModel | None, str]:
    """The novelty model with the threshold in effect (--novelty, else the manifest's), and a
    line saying which; (None, why) when off."""
    choice = options.novelty.strip().lower()
    if choice == "off":
        return None, "Novelty flag off (--novelty off)"
    given: float | None = None
    if choice != "auto":
        try:
            given = float(choice)
        except ValueError:
            raise UsageError(
                f"--novelty {options.novelty!r}: use auto, off or a threshold (a number)"
            ) from None
        if not math.isfinite(given):
            raise UsageError(f"--novelty {options.novelty!r}: a threshold must be a number")
    entry = manifest.novelty
    if entry is None:
        if given is not None:
            raise UsageError(
                f"--novelty {given:g}: this model has no novelty score (its build ran with "
                'novelty.target = "off", or before tlbuild had one); use --novelty off'
            )
        return None, ""
    manifest.verify(folder, entry.file)
    model = NoveltyModel.load(folder / entry.file)
    if given is not None:
        model.threshold = given
        return model, f"Novelty threshold {given:g} from --novelty"
    model.threshold = entry.threshold
    return model, (
        f"Novelty threshold {entry.threshold:.4g} from the manifest (flags "
        f"{entry.val['flagged']:.1%} of validation images; target {entry.target:.1%})"
    )


def _check_options(options: ClassifyOptions) -> None:
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if options.topk < 1:
        raise UsageError("--topk must be at least 1")
    if options.workers < 0:
        raise UsageError("--workers must be 0 (one per core) or more")
    if options.max_error_rate is not None and not 0.0 <= options.max_error_rate <= 1.0:
        raise UsageError("--max-error-rate is a fraction between 0 and 1, e.g. 0.01")
    if options.engine not in ENGINES:
        raise UsageError(f"--engine {options.engine!r}: use one of {', '.join(ENGINES)}")
    if options.part_rows < 1:
        raise UsageError("--part-rows must be at least 1")
    r = options.ray
    if r is not None and options.engine != "ray":
        raise UsageError("--ray-address, --actors and --*-per-actor need --engine ray")
    if r is not None:
        if r.actors is not None and r.actors < 1:
            raise UsageError("--actors must be at least 1")
        if r.cpus_per_actor <= 0 or r.gpus_per_actor < 0:
            raise UsageError("--cpus-per-actor must be above 0 and --gpus-per-actor 0 or more")


class Kept:
    """What a run has written so far, in words; asked only when the run is cut short."""

    def __init__(self) -> None:
        self.results: ResultsFile | ResultsDataset | None = None

    def __call__(self) -> str:
        return "this run wrote no rows" if self.results is None else self.results.kept()


def _open_results(out: str, identity: dict[str, Any], options: ClassifyOptions, warn):  # noqa: ANN001, ANN202
    if is_dataset_out(out):
        return ResultsDataset(
            out,
            identity,
            overwrite=options.overwrite,
            retry_errors=options.retry_errors,
            part_rows=options.part_rows,
            warn=warn,
        )
    if is_url(out):
        raise UsageError(f"--out {out}: in object storage, name a folder ending in '/'")
    if options.compact:
        raise UsageError("--compact merges the part files of a folder --out; this is one file")
    return ResultsFile(
        Path(out),
        identity,
        overwrite=options.overwrite,
        retry_errors=options.retry_errors,
        warn=warn,
    )


def classify(
    inputs: list[str],
    model: str | Path,
    out: str | Path,
    options: ClassifyOptions,
    on_batch: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    kept: Kept | None = None,
) -> ClassifySummary:
    """Classify every image under `inputs` into `out` (a Parquet file or folder); resumable.

    `kept`, if given, can say at any moment where this run's rows are (for a run cut short)."""
    _check_options(options)
    model, out = str(model), str(out)
    inputs = check_inputs(inputs) if inputs or not options.compact else []
    engine = open_engine(options, warn)
    try:
        local = local_model(model, options.model_cache or default_model_cache(), options.artifact)
        plan = _plan(engine.choose_model(model, local), out, options)
        return _classify(inputs, plan, engine, options, on_batch, warn, kept or Kept())
    finally:
        engine.close()


@dataclass
class _Plan:
    """What a run settles before its first row, from the chosen model and its manifest."""

    choice: ModelChoice
    decider: Decider
    sha256: str
    identity: dict[str, Any]
    summary: ClassifySummary


def _decider(
    manifest: Manifest,
    options: ClassifyOptions,
    ok_class: str | None,
    threshold: float | None,
    novelty: NoveltyModel | None,
) -> Decider:
    image = None
    if novelty is not None and manifest.onnx is not None and manifest.onnx.features:
        spec = manifest.preprocessing
        image = image_block(manifest.onnx.features["layout"], spec["mean"], spec["std"])
    return Decider(manifest.classes, options.topk, ok_class, threshold, novelty, image)


def default_decider(folder: Path, manifest: Manifest) -> Decider:
    """The decision rule `tlbuild classify` applies to this export folder with its defaults
    (the manifest's ok class, threshold and novelty threshold): the conformance kit's."""
    options = ClassifyOptions()
    ok_class = _resolve_ok_class(options, manifest, manifest.classes)
    threshold, _ = _resolve_threshold(options, manifest, ok_class)
    novelty, _ = _resolve_novelty(options, manifest, folder)
    return _decider(manifest, options, ok_class, threshold, novelty)


def _plan(choice: ModelChoice, out: str, options: ClassifyOptions) -> _Plan:
    """The run's decision rule and results identity, from the chosen model's manifest."""
    manifest = read_manifest(choice.folder)
    classes = manifest.classes
    ok_class = _resolve_ok_class(options, manifest, classes)
    threshold, decided = _resolve_threshold(options, manifest, ok_class)
    novelty, novelty_said = _resolve_novelty(options, manifest, choice.folder)
    sha = manifest.artifacts[choice.artifact].sha256
    decider = _decider(manifest, options, ok_class, threshold, novelty)
    identity = {
        "model_sha256": sha,
        "artifact": choice.artifact,
        "ok_class": ok_class,
        "threshold": threshold,  # the effective one: a new manifest threshold is refused too
        "novelty_threshold": None if novelty is None else novelty.threshold,
        "topk": decider.topk,
        "precision": choice.precision,
        "classes": classes,
        # An image model decodes fully: its graph resizes from the file's own pixels.
        "decode": "exact"
        if options.exact_decode or is_image_model(choice.artifact)
        else "jpeg-draft",
        "model_name": manifest.name,
    }
    summary = ClassifySummary(out, choice.artifact, choice.backend, ok_class=ok_class)
    summary.decision = decided
    summary.novelty = novelty_said
    reference = (manifest.novelty.model_dump().get("reference") if manifest.novelty else None) or {}
    if reference.get("labels"):
        summary.drift = DriftCounter(reference)
    summary.engine = options.engine
    summary.rule = decider.rule
    return _Plan(choice, decider, sha, identity, summary)


def _record_drift(
    summary: ClassifySummary, results: ResultsFile | ResultsDataset, warned: Callable[[str], None]
) -> None:
    """Compare the run with validation's profile: warn past the limits, keep the figures."""
    assert summary.drift is not None
    figures = summary.drift.figures()
    summary.drift_figures = figures
    for msg in drift_warnings(figures):
        warned(f"drift: {msg}")
    results.record_run(
        {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": summary.rows,
            "errors": summary.errors,
            "flagged": summary.novel,
            "artifact": summary.artifact,
            "drift": figures,
        }
    )


def _classify(
    inputs: list[str],
    plan: _Plan,
    engine: Engine,
    options: ClassifyOptions,
    on_batch: Callable[[int], None] | None,
    warn: Callable[[str], None] | None,
    kept: Kept,
) -> ClassifySummary:
    """Every input under `inputs` not yet in the results, through `engine`, into them."""
    summary = plan.summary

    def warned(msg: str) -> None:
        summary.warnings += 1
        if warn is not None:
            warn(msg)

    results = kept.results = _open_results(summary.out, plan.identity, options, warned)
    summary.previous_rows = results.previous_rows
    for reason in plan.choice.passed_over:
        warned(f"passed over {reason}")
    walker = InputWalker(options.extensions, warned)

    def todo() -> Iterator[str]:
        for p in walker(inputs):
            if results.claim(p):
                yield p
            else:
                summary.skipped += 1

    def write(cols: dict[str, Any]) -> None:
        results.add(cols)
        summary.count(cols)
        if on_batch is not None:
            on_batch(len(cols["path"]))

    t0 = time.perf_counter()
    try:
        for cols in engine.rows(todo(), plan.choice, plan.decider, plan.sha256):
            write(cols)
        if summary.drift is not None and summary.rows - summary.errors > 0:
            _record_drift(summary, results, warned)
        if options.compact:
            summary.parts = results.compact()
    finally:
        results.close()
        summary.seconds = time.perf_counter() - t0
        summary.ignored_files = walker.ignored
    return summary
