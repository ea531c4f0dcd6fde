"""From file paths to result rows: decode (a bad file becomes an error row), predict, decide.

Shared by the local engine (decode threads, inference in the main thread) and the Ray engine
(both inside each actor), so the two write the same rows bit for bit.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlbuild.classify.results import COLUMNS, storable
from tlbuild.classify.storage import is_url, read_bytes
from tlbuild.data.images import decode
from tlbuild.data.preprocess import ModelInput, Preprocessing, load_input
from tlbuild.errors import UsageError
from tlbuild.novelty.drift import ImageBlock
from tlbuild.novelty.score import NoveltyModel
from tlbuild.runtime.backends import images_logits
from tlbuild.runtime.base import Predictor, softmax


@dataclass
class Decoded:
    """One batch of files: the readable ones preprocessed, the others with their reason."""

    paths: list[str]
    # (n_ok, 3, H, W) for the readable files, in order; for a model that takes images (a
    # model_image twin), their decoded pixels, uint8 (H, W, 3) at each file's own size
    batch: np.ndarray | list[np.ndarray]
    ok: list[int]  # indices into paths of the rows in batch
    width: list[int | None]
    height: list[int | None]
    size: list[int | None]
    error: list[str | None]

    @staticmethod
    def merge(parts: list[Decoded]) -> Decoded:
        """One batch of several, in order."""
        pixels = [x for d in parts if isinstance(d.batch, list) for x in d.batch]
        arrays = [d.batch for d in parts if not isinstance(d.batch, list)]
        merged = Decoded([], pixels if pixels or not arrays else np.concatenate(arrays),
                         [], [], [], [], [])  # fmt: skip
        for d in parts:
            merged.ok += [len(merged.paths) + i for i in d.ok]
            merged.paths += d.paths
            merged.width += d.width
            merged.height += d.height
            merged.size += d.size
            merged.error += d.error
        return merged


def _local_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _storage_reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read: {type(e).__name__}: {e}"


def decode_batch(
    paths: list[str], spec: Preprocessing, exact: bool, images: bool = False
) -> Decoded:
    """Decode and preprocess `paths`; every failure is kept per file, never raised. With
    `images`, keep each file's decoded pixels instead (fully decoded, at its own size)."""
    h, w = spec.input_size
    batch = np.empty((0 if images else len(paths), 3, h, w), np.float32)
    pixels: list[np.ndarray] = []
    d = Decoded(paths, batch, [], [], [], [], [])
    for i, p in enumerate(paths):
        remote = is_url(p)
        data: bytes | None = None
        size = None if remote else _local_size(p)
        try:
            if remote:
                data = read_bytes(p)
                size = len(data)
            if images:
                full = decode(p, None, data)
                pixels.append(np.asarray(full.image))
                mi = ModelInput(pixels[-1], full.width, full.height)
            else:
                mi = load_input(p, spec, exact, data)
        except Exception as e:  # one bad file must never stop a nightly run
            reason = getattr(e, "reason", None)
            if reason is None:
                fetch_failed = remote and data is None
                reason = (
                    _storage_reason(e)
                    if fetch_failed
                    else f"cannot decode: {type(e).__name__}: {e}"
                )
            d.size.append(size)
            d.width.append(None), d.height.append(None)
            d.error.append(storable(reason))  # messages can quote undecodable file names
            continue
        d.size.append(size)
        if not images:
            batch[len(d.ok)] = mi.array
        d.ok.append(i)
        d.width.append(mi.width), d.height.append(mi.height), d.error.append(None)
    d.batch = pixels if images else batch[: len(d.ok)]
    return d


NOVELTY_COLUMNS = ("novelty", "novel", "brightness", "sharpness")


class Decider:
    """Turns probabilities into label, top-k and the ok/defective decision with its rule; and,
    with a novelty model, features into the novelty score and its flag."""

    def __init__(
        self,
        classes: list[str],
        topk: int,
        ok_class: str | None,
        threshold: float | None,
        novelty: NoveltyModel | None = None,
        image: ImageBlock | None = None,
    ) -> None:
        self.classes = np.asarray(classes, dtype=object)
        self.topk = min(topk, len(classes))
        self.ok = classes.index(ok_class) if ok_class is not None else None
        self.threshold = threshold
        self.novelty = novelty
        self.image = image  # where brightness and sharpness are read from the features
        if ok_class is None:
            self.rule = None
        elif threshold is None:
            self.rule = "argmax"
        else:
            self.rule = f"p({ok_class})<{threshold:g}"
        self.novelty_rule = None if novelty is None else f"novelty>{novelty.threshold:.4g}"

    def novelty_rows(self, features: np.ndarray | None, n: int) -> dict[str, list[Any]]:
        """Columns novelty and novel (the score and whether it is over the threshold), and the
        image's brightness and sharpness."""
        out: dict[str, list[Any]] = {c: [None] * n for c in NOVELTY_COLUMNS}
        if self.novelty is None:
            return out
        if features is None:
            raise UsageError(
                "this artifact has no features output, so no novelty score; use --novelty off "
                "or rebuild the export folder"
            )
        scores = self.novelty.scores(features)
        assert self.novelty.threshold is not None
        out["novelty"] = [float(s) for s in scores]
        out["novel"] = [bool(s > self.novelty.threshold) for s in scores]
        if self.image is not None:
            bright, sharp = self.image.measures(features)
            out["brightness"] = [round(float(b), 5) for b in bright]
            out["sharpness"] = [round(float(x), 5) for x in sharp]
        return out

    def decide(self, logits: np.ndarray, features: np.ndarray | None) -> dict[str, list[Any]]:
        """Every decision column for one batch: a novel image is never passed as good (it is
        defective, and decided_by names the novelty rule)."""
        out = self.rows(softmax(logits))
        out.update(self.novelty_rows(features, len(logits)))
        if self.ok is not None and self.novelty_rule is not None:
            for i, novel in enumerate(out["novel"]):
                if novel:
                    out["defective"][i] = True
                    out["decided_by"][i] = self.novelty_rule
        return out

    def rows(self, probs: np.ndarray) -> dict[str, list[Any]]:
        """Columns label, score, topk_*, ok_score, defective and decided_by for `probs`."""
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


class RowMaker:
    """A Predictor and a Decider: decoded batches in, every column of COLUMNS out."""

    def __init__(self, predictor: Predictor, decider: Decider, sha256: str) -> None:
        self.predictor = predictor
        self.decider = decider
        self.constant = {
            "model_sha256": sha256,
            "artifact": predictor.artifact.name,
            "precision": predictor.precision,
        }

    def _outputs(
        self, batch: np.ndarray | list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits, and the features where the novelty score needs them, for one batch (an
        image model's decoded images: one run per size)."""
        novelty = self.decider.novelty is not None
        if isinstance(batch, list):
            return images_logits(self.predictor, batch, with_features=novelty)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if not novelty:
            return self.predictor.logits(x), None
        return self.predictor.logits_and_features(x)

    def rows(self, d: Decoded) -> dict[str, list[Any]]:
        """Result columns for one decoded batch, error rows included, in the batch's order."""
        n = len(d.paths)
        cols: dict[str, list[Any]] = {c: [None] * n for c in COLUMNS}
        cols["path"] = [storable(p) for p in d.paths]
        if d.ok:
            logits, features = self._outputs(d.batch)
            for c, values in self.decider.decide(logits, features).items():
                for i, v in zip(d.ok, values, strict=True):
                    cols[c][i] = v
        cols["width"], cols["height"] = d.width, d.height
        cols["file_size"], cols["error"] = d.size, d.error
        for c, v in self.constant.items():
            cols[c] = [v] * n
        cols["classified_at"] = [time.time_ns() // 1000] * n
        return cols


def reason_kind(reason: str) -> str:
    """Group error messages for the summary ('cannot decode: ...' details vary per file)."""
    return reason.split(":")[0].split(" (")[0]


def chunks(items: Iterable[str], n: int) -> Iterator[list[str]]:
    """Lists of up to `n` items, drawn lazily (inputs can run to millions of paths)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk
