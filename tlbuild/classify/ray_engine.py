"""The Ray engine for classify: actors on a Ray cluster decode and classify, this process writes.

Needs `pip install 'tlbuild[ray]'`; nothing else in tlbuild imports Ray. How it runs:
- Paths are listed here, on the driver, in rounds of ROUND_PATHS (resume and duplicate checks
  stay where the writer is, and no Ray read task competes with the actors for CPUs: listing
  with read_binary_files while actors held every CPU hung in the prototype).
- Each round is a Ray Data dataset of paths, mapped by a pool of actors that each hold one
  Predictor. Decode stays inside the actor, per file, so one bad file is one error row (Ray's
  read_images fails the job, or drops good rows with bad blocks) and no decode stage spawns
  processes: on CPU actors a separate decode stage was slower.
- Rows come back as Arrow tables with one explicit schema (an all-None column would otherwise
  arrive as float NaN) and are written by the same writer as the local engine, so the files,
  resume, lock and --retry-errors are the same. Ray Data streams with backpressure, so memory
  does not grow with the number of files.
Before any row, one Ray task with an actor's resources opens the model: the artifact chosen
there (its GPU, its TensorRT) is the one every actor then loads by name, and the identity the
results carry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.classify.options import ClassifyOptions, ModelChoice, RayOptions, provider_of
from tlbuild.classify.results import COLUMNS
from tlbuild.classify.rows import Decider, Decoded, RowMaker, chunks, decode_batch
from tlbuild.classify.storage import default_model_cache, is_url, local_model
from tlbuild.data.decode_threads import DecodeThreads
from tlbuild.errors import TlbuildError, UsageError
from tlbuild.novelty.score import one_blas_thread

# Paths per Ray Data dataset. Each round restarts the actor pool (about a second per actor to
# open the model), so rounds are large; the list itself costs ~100 bytes a path on the driver.
ROUND_PATHS = 200_000


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra, not just core
    except ImportError:
        raise UsageError(
            "--engine ray needs Ray Data: pip install 'tlbuild[ray]' (or use --engine local)"
        ) from None
    return ray


def _arrow_schema() -> Any:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("score", pa.float64()),
            ("topk_labels", pa.list_(pa.string())),
            ("topk_scores", pa.list_(pa.float64())),
            ("ok_score", pa.float64()),
            ("defective", pa.bool_()),
            ("decided_by", pa.string()),
            ("novelty", pa.float64()),
            ("novel", pa.bool_()),
            ("brightness", pa.float64()),
            ("sharpness", pa.float64()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("file_size", pa.int64()),
            ("error", pa.string()),
            ("model_sha256", pa.string()),
            ("artifact", pa.string()),
            ("precision", pa.string()),
            ("classified_at", pa.int64()),
        ]
    )
    # The actors' tables become rows of the results file: the same columns, in its order.
    assert schema.names == list(COLUMNS), "ray_engine's schema is behind results.COLUMNS"
    return schema


def _open_model(source: str, cache: str, artifact: str | None, provider: str, threads: int) -> Any:
    """A Predictor on this node; a URL is fetched once per node into `cache`."""
    from tlbuild.runtime.load import load_predictor

    path = local_model(source, Path(cache), artifact)
    return load_predictor(path, artifact, provider, threads=threads, spinning=False)


def _probe(source: str, cache: str, artifact: str | None, provider: str) -> dict[str, Any]:
    """Run where an actor would: which artifact and provider start there."""
    predictor = _open_model(source, cache, artifact, provider, threads=1)
    return {
        "artifact": predictor.artifact.name,
        "provider": provider_of(predictor.backend, predictor.artifact.name),
        "precision": predictor.precision,
        "backend": predictor.backend,
        "passed_over": list(predictor.passed_over),
    }


@dataclass(frozen=True)
class _ActorModel:
    """The model every actor opens: `_open_model`'s arguments bar the thread count."""

    source: str
    cache: str
    artifact: str
    provider: str


class Classifier:
    """A Ray Data actor: holds one Predictor; a batch of paths in, a table of result rows out."""

    def __init__(
        self, model: _ActorModel, decider: Decider, sha256: str, threads: int, exact: bool
    ) -> None:
        import pyarrow as pa

        self._pa = pa
        self.schema = _arrow_schema()
        # One ORT thread per CPU the actor holds; decode gets the same number of threads.
        predictor = _open_model(model.source, model.cache, model.artifact, model.provider, threads)
        self.maker = RowMaker(predictor, decider, sha256)
        # The actor's process is this classifier's alone: one BLAS thread for its lifetime.
        self._blas = one_blas_thread()
        self._blas.__enter__()
        self.exact = exact
        self.threads = threads
        self.pool = DecodeThreads(threads) if threads > 1 else None

    def _decode(self, paths: list[str]) -> Decoded:
        spec = self.maker.predictor.preprocessing
        images = self.maker.predictor.takes_images
        if self.pool is None or len(paths) < 2 * self.threads:
            return decode_batch(paths, spec, self.exact, images)
        size = -(-len(paths) // self.threads)

        def decode(chunk: list[str]) -> Decoded:
            return decode_batch(chunk, spec, self.exact, images)

        return Decoded.merge(list(self.pool.imap(decode, chunks(paths, size), self.threads)))

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        # Paths travel as bytes: a file name that is not UTF-8 cannot be an Arrow string.
        paths = [bytes(p).decode("utf-8", "surrogateescape") for p in batch["path"]]
        cols = self.maker.rows(self._decode(paths))
        return self._pa.Table.from_pydict(cols, schema=self.schema)


class RayEngine:
    """Connects to (or starts) Ray, picks the model where it runs, streams result rows back."""

    def __init__(self, options: ClassifyOptions, warn: Callable[[str], None] | None = None) -> None:
        self.ray = _import_ray()
        self.r = options.ray or RayOptions()
        self.options = options
        self.warn = warn or (lambda msg: None)
        self.cache = str(options.model_cache or default_model_cache())
        self.started = False
        self._connect()

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():  # a caller (a notebook, a test) already connected
            return
        # No address and no RAY_ADDRESS: a private local cluster, named explicitly, because a
        # plain ray.init() can hang on a stale cluster file left by an earlier `ray start`.
        address = self.r.address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
        if address == "local":
            kwargs["include_dashboard"] = False
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(
                f"--ray-address {address}: cannot connect to Ray ({e}); start a cluster with "
                "`ray start --head`, or use --ray-address local"
            ) from None
        self.started = True
        # classify draws its own progress bar; Ray Data's would interleave with it (and it
        # warns when told so, hence the logger first).
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

    def close(self) -> None:
        """Disconnect (and stop the local cluster) if this engine started it."""
        if self.started:
            self.ray.shutdown()
            self.started = False

    def _resources(self) -> dict[str, float]:
        return {"num_cpus": self.r.cpus_per_actor, "num_gpus": self.r.gpus_per_actor}

    def actors(self) -> int:
        """--actors, else as many as the cluster's CPUs (or GPUs, for GPU actors) hold."""
        if self.r.actors is not None:
            return self.r.actors
        total = self.ray.cluster_resources()
        if self.r.gpus_per_actor > 0:
            n = int(total.get("GPU", 0) // self.r.gpus_per_actor)
            if n < 1:
                raise UsageError("--gpus-per-actor: the Ray cluster has no GPU")
            return n
        return max(1, int(total.get("CPU", 1) // self.r.cpus_per_actor))

    def _unwrap(self, e: Exception) -> Exception:
        """A tlbuild error raised inside Ray (a bad --model) as itself, not a Ray traceback."""
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, TlbuildError) else e

    def choose_model(self, source: str, local: Path) -> ModelChoice:
        """The artifact and provider one actor gets, found by a task with an actor's resources."""
        o = self.options
        probe = self.ray.remote(**self._resources())(_probe)
        try:
            got = self.ray.get(
                probe.remote(self._where(source, local), self.cache, o.artifact, o.provider)
            )
        except self.ray.exceptions.RayError as e:
            raise self._unwrap(e) from None
        folder = local if local.is_dir() else local.parent
        return ModelChoice(
            folder,
            source,
            got["artifact"],
            got["provider"],
            got["precision"],
            got["backend"],
            tuple(got["passed_over"]),
        )

    def _where(self, source: str, local: Path) -> str:
        # A URL is fetched by each node; a local path must be on every node (a shared
        # file system, or the cluster image) and is passed as an absolute path.
        return source if is_url(source) else str(local.resolve())

    def rows(
        self, paths: Iterator[str], choice: ModelChoice, decider: Decider, sha256: str
    ) -> Iterator[dict[str, list[Any]]]:
        """Result columns, one batch at a time, for every path (in no particular order)."""
        ray = self.ray
        o = self.options
        actors = self.actors()
        threads = max(1, int(self.r.cpus_per_actor))
        kwargs = {
            "model": _ActorModel(
                self._where(choice.source, choice.folder / choice.artifact),
                self.cache,
                choice.artifact,
                choice.provider,
            ),
            "decider": decider,
            "sha256": sha256,
            "threads": threads,
            "exact": o.exact_decode,
        }
        for round_paths in chunks(paths, ROUND_PATHS):
            items = [{"path": p.encode("utf-8", "surrogateescape")} for p in round_paths]
            blocks = max(1, min(len(items) // o.batch_size, actors * 8))
            # Ray 2.60 logs one "constructor arguments in the object store" error per actor
            # for every map_batches actor, whatever its arguments (ray-project/ray#57733).
            ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                Classifier,
                fn_constructor_kwargs=kwargs,
                batch_size=o.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                **self._resources(),
            )
            try:
                for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    yield table.to_pydict()
            except ray.exceptions.RayError as e:
                raise self._unwrap(e) from None
