"""The local classify engine: decode in daemon threads, run the model in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tlbuild.bench.environment import cpu_cores
from tlbuild.classify.options import ClassifyOptions, ModelChoice, provider_of
from tlbuild.classify.rows import Decider, Decoded, RowMaker, chunks, decode_batch
from tlbuild.data.decode_threads import DecodeThreads
from tlbuild.novelty.score import one_blas_thread
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.load import load_predictor


class LocalEngine:
    """One Predictor here; rows in input order."""

    def __init__(self, options: ClassifyOptions, warn: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.predictor: Predictor | None = None

    def choose_model(self, source: str, local: Path) -> ModelChoice:
        """Open the artifact and provider the options ask for (or the fastest, for auto)."""
        o = self.options
        p = load_predictor(local, o.artifact, o.provider, threads=cpu_cores(), spinning=False)
        self.predictor = p
        name = p.artifact.name
        return ModelChoice(
            p.artifact.parent,
            source,
            name,
            provider_of(p.backend, name),
            p.precision,
            p.backend,
            tuple(p.passed_over),
        )

    def rows(
        self, paths: Iterator[str], choice: ModelChoice, decider: Decider, sha256: str
    ) -> Iterator[dict[str, list[Any]]]:
        """Result columns, one batch at a time, in input order."""
        assert self.predictor is not None, "choose_model first"
        maker = RowMaker(self.predictor, decider, sha256)
        workers = self.options.workers or cpu_cores()
        spec, exact = self.predictor.preprocessing, self.options.exact_decode
        images = self.predictor.takes_images

        def decode(chunk: list[str]) -> Decoded:
            return decode_batch(chunk, spec, exact, images)

        # Daemon threads: a decode stuck in a read cannot keep Ctrl-C or SIGTERM from ending
        # the run (the rows written so far are committed by the caller, in its thread). A few
        # batches decode ahead of inference: enough to hide decode behind it, few enough that
        # memory does not depend on how many files there are.
        with DecodeThreads(workers) as pool, one_blas_thread():
            # Decoded frames at full size (an image model's) are far larger than model inputs:
            # one batch ahead, not one per worker, keeps 12 MP frames to a few hundred MB.
            ahead = 2 if images else workers + 1
            for decoded in pool.imap(decode, chunks(paths, self.options.batch_size), ahead):
                yield maker.rows(decoded)

    def close(self) -> None:
        """Nothing held beyond the Predictor."""
