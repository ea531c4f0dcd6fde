"""Batch classification: lazy file discovery -> parallel decode -> batched inference -> Parquet."""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.bench.environment import cpu_cores
from tlbuild.classify.inputs import InputWalker, check_inputs
from tlbuild.classify.results import COLUMNS, ResultsFile, storable
from tlbuild.data.images import IMAGE_EXTENSIONS
from tlbuild.data.preprocess import Preprocessing, load_input
from tlbuild.errors import BuildError, UsageError
from tlbuild.manifest import Manifest, read_manifest
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.load import load_predictor


@dataclass(frozen=True)
class ClassifyOptions:
    """Everything `tlbuild classify` can be told besides inputs, model and output."""

    artifact: str | None = None
    provider: str = "auto"
    batch_size: int = 32
    workers: int = 0  # decode threads; 0 = one per core
    topk: int = 3
    ok_class: str | None = None  # None: the model's ok_class from its manifest, if any
    threshold: float | None = None
    exact_decode: bool = False
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    overwrite: bool = False
    retry_errors: bool = False
    max_error_rate: float | None = None


@dataclass
class ClassifySummary:
    """What one run did; rendered by the CLI."""

    out: Path
    artifact: str
    backend: str
    rows: int = 0
    skipped: int = 0  # already in the results from an earlier run
    previous_rows: int = 0
    errors: int = 0
    defective: int = 0
    ok_class: str | None = None
    seconds: float = 0.0
    labels: Counter[str] = field(default_factory=Counter)
    error_reasons: Counter[str] = field(default_factory=Counter)
    ignored_files: int = 0
    warnings: int = 0

    @property
    def rate(self) -> float:
        """Images per second over the whole run."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def check_error_rate(self, limit: float | None) -> None:
        """BuildError (exit 1) if more than `limit` (a fraction) of this run's inputs failed."""
        if limit is not None and self.rows and self.errors / self.rows > limit:
            raise BuildError(
                f"{self.errors} of {self.rows} inputs ({self.errors / self.rows:.1%}) could not "
                f"be classified, over --max-error-rate {limit:g}; their rows are in {self.out} "
                "with the reason in the 'error' column"
            )


@dataclass
class _Decoded:
    paths: list[str]
    batch: np.ndarray  # (n_ok, 3, H, W) for the readable files, in order
    ok: list[int]  # indices into paths of the rows in batch
    width: list[int | None]
    height: list[int | None]
    size: list[int | None]
    error: list[str | None]


def _decode_batch(paths: list[str], spec: Preprocessing, exact: bool) -> _Decoded:
    h, w = spec.input_size
    batch = np.empty((len(paths), 3, h, w), np.float32)
    d = _Decoded(paths, batch, [], [], [], [], [])
    for i, p in enumerate(paths):
        try:
            size: int | None = os.stat(p).st_size
        except OSError:
            size = None
        d.size.append(size)
        try:
            mi = load_input(p, spec, exact)
        except Exception as e:  # one bad file must never stop a nightly run
            reason = getattr(e, "reason", None) or f"cannot decode: {type(e).__name__}: {e}"
            reason = storable(reason)  # messages can quote undecodable file names
            d.width.append(None), d.height.append(None), d.error.append(reason)
            continue
        batch[len(d.ok)] = mi.array
        d.ok.append(i)
        d.width.append(mi.width), d.height.append(mi.height), d.error.append(None)
    d.batch = batch[: len(d.ok)]
    return d


def _chunks(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class _Decider:
    """Turns probabilities into label, top-k and the ok/defective decision with its rule."""

    def __init__(
        self, classes: list[str], topk: int, ok_class: str | None, threshold: float | None
    ) -> None:
        self.classes = np.asarray(classes, dtype=object)
        self.topk = min(topk, len(classes))
        self.ok = classes.index(ok_class) if ok_class is not None else None
        self.threshold = threshold
        if ok_class is None:
            self.rule = None
        elif threshold is None:
            self.rule = "argmax"
        else:
            self.rule = f"p({ok_class})<{threshold:g}"

    def rows(self, probs: np.ndarray) -> dict[str, list[Any]]:
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.topk]
        top = np.take_along_axis(probs, order, axis=1)
        out: dict[str, list[Any]] = {
            "label": list(self.classes[order[:, 0]]),
            "score": [float(s) for s in top[:, 0]],
            "topk_labels": [list(r) for r in self.classes[order]],
            "topk_scores": [[round(float(s), 6) for s in r] for r in top],
        }
        n = len(probs)
        if self.ok is None:
            out["ok_score"], out["defective"], out["decided_by"] = (
                [None] * n,
                [None] * n,
                [None] * n,
            )
        else:
            p_ok = probs[:, self.ok]
            bad = order[:, 0] != self.ok if self.threshold is None else p_ok < self.threshold
            out["ok_score"] = [float(p) for p in p_ok]
            out["defective"] = [bool(b) for b in bad]
            out["decided_by"] = [self.rule] * n
        return out


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


def _check_options(options: ClassifyOptions) -> None:
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if options.topk < 1:
        raise UsageError("--topk must be at least 1")
    if options.workers < 0:
        raise UsageError("--workers must be 0 (one per core) or more")
    if options.max_error_rate is not None and not 0.0 <= options.max_error_rate <= 1.0:
        raise UsageError("--max-error-rate is a fraction between 0 and 1, e.g. 0.01")


def classify(
    inputs: list[str],
    model: Path,
    out: Path,
    options: ClassifyOptions,
    on_batch: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ClassifySummary:
    """Classify every image under `inputs` into the Parquet file `out`; resumable."""
    _check_options(options)
    inputs = check_inputs(inputs)
    cores = cpu_cores()
    workers = options.workers or cores
    predictor: Predictor = load_predictor(
        model, options.artifact, options.provider, threads=cores, spinning=False
    )
    manifest = read_manifest(predictor.artifact.parent)
    classes = predictor.classes
    ok_class = _resolve_ok_class(options, manifest, classes)
    name = predictor.artifact.name
    sha = manifest.artifacts[name].sha256
    decider = _Decider(classes, options.topk, ok_class, options.threshold)
    identity = {
        "model_sha256": sha,
        "artifact": name,
        "ok_class": ok_class,
        "threshold": options.threshold,
        "topk": decider.topk,
        "precision": predictor.precision,
        "classes": classes,
        "decode": "exact" if options.exact_decode else "jpeg-draft",
        "model_name": manifest.name,
    }
    results = ResultsFile(
        out, identity, overwrite=options.overwrite, retry_errors=options.retry_errors
    )
    summary = ClassifySummary(out, name, predictor.backend, ok_class=ok_class)
    summary.previous_rows = results.previous_rows

    def warned(msg: str) -> None:
        summary.warnings += 1
        if warn is not None:
            warn(msg)

    for reason in predictor.passed_over:
        warned(f"passed over {reason}")
    walker = InputWalker(options.extensions, warned)

    def todo() -> Iterator[str]:
        for p in walker(inputs):
            if results.claim(p):
                yield p
            else:
                summary.skipped += 1

    constant = {"model_sha256": sha, "artifact": name, "precision": predictor.precision}
    spec = predictor.preprocessing

    def finish(d: _Decoded) -> None:
        n = len(d.paths)
        cols: dict[str, list[Any]] = {c: [None] * n for c in COLUMNS}
        cols["path"] = [storable(p) for p in d.paths]
        if d.ok:
            decided = decider.rows(predictor.predict(d.batch))
            for c, values in decided.items():
                for i, v in zip(d.ok, values, strict=True):
                    cols[c][i] = v
        cols["width"], cols["height"] = d.width, d.height
        cols["file_size"], cols["error"] = d.size, d.error
        for c, v in constant.items():
            cols[c] = [v] * n
        cols["classified_at"] = [time.time_ns() // 1000] * n
        results.add(cols)
        summary.rows += n
        summary.errors += n - len(d.ok)
        summary.labels.update(cols["label"][i] for i in d.ok)
        summary.error_reasons.update(_reason_kind(e) for e in d.error if e is not None)
        if decider.ok is not None:
            summary.defective += sum(1 for i in d.ok if cols["defective"][i])
        if on_batch is not None:
            on_batch(n)

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tlbuild-decode")
    window: deque[Future[_Decoded]] = deque()
    try:
        # Keep a few batches decoding ahead of inference: enough to hide decode behind
        # inference, few enough that memory does not depend on how many files there are.
        for chunk in _chunks(todo(), options.batch_size):
            window.append(pool.submit(_decode_batch, chunk, spec, options.exact_decode))
            if len(window) > workers + 1:
                finish(window.popleft().result())
        while window:
            finish(window.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        results.close()
        summary.seconds = time.perf_counter() - t0
        summary.ignored_files = walker.ignored
    return summary


def _reason_kind(reason: str) -> str:
    """Group error messages for the summary ('cannot decode: ...' details vary per file)."""
    return reason.split(":")[0].split(" (")[0]
