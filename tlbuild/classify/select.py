"""`tlbuild select`: the images of a classify run most worth labelling next.

Flagged (novel) images first, most novel first; then the answers nearest the decision (the
threshold on p(ok), or the smallest top-class probability without one). Within that order the
picks are spread out in the model's feature space (greedy farthest-point on the normalised
pre-logits vector), so N picks are N different problems, not N copies of one.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.classify.storage import is_url, read_bytes
from tlbuild.data.images import load_rgb
from tlbuild.errors import UsageError
from tlbuild.export.feature_graph import split_blocks
from tlbuild.fileio import atomic_path, write_text
from tlbuild.manifest import read_manifest
from tlbuild.runtime.load import load_predictor

POOL = 4  # candidates per pick, drawn in priority order, among which the spread is chosen
SELECTION_CSV = "selection.csv"


@dataclass
class Candidate:
    """One results row that may be picked, and why."""

    path: str
    tier: int  # 0: flagged as novel, 1: near the decision
    priority: float  # higher first within a tier
    reason: str
    row: dict[str, Any]


def read_results(results: str) -> Any:
    """The readable rows of a results file or folder, as a DataFrame."""
    import pandas as pd

    try:
        df = pd.read_parquet(results)
    except FileNotFoundError:
        raise UsageError(f"no results at {results}; run `tlbuild classify` first") from None
    except Exception as e:
        raise UsageError(f"cannot read {results} as classify results: {e}") from None
    missing = {"path", "label", "score", "error", "novelty", "novel"} - set(df.columns)
    if missing:
        raise UsageError(
            f"{results} lacks columns {sorted(missing)}: results of an older tlbuild classify; "
            "classify again with --overwrite"
        )
    return df[df.error.isna()]


def _threshold(decided_by: Any) -> float | None:
    m = re.fullmatch(r"p\(.+\)<([0-9.eE+-]+)", str(decided_by))
    return float(m.group(1)) if m else None


def candidates(df: Any) -> list[Candidate]:
    """Every readable row with its tier and priority, best first."""
    out = []
    for row in df.to_dict("records"):
        novel = bool(row.get("novel")) if row.get("novel") is not None else False
        if novel:
            score = float(row["novelty"])
            out.append(Candidate(row["path"], 0, score, f"novel (score {score:.3g})", row))
            continue
        t = _threshold(row.get("decided_by"))
        ok = row.get("ok_score")
        if t is not None and ok is not None and ok == ok:
            gap = abs(float(ok) - t)
            reason = f"p(ok) {float(ok):.3f}, {gap:.3f} from the threshold {t:g}"
        else:
            gap = float(row["score"])
            reason = f"top class {row['label']} at p = {gap:.3f}"
        out.append(Candidate(row["path"], 1, -gap, reason, row))
    out.sort(key=lambda c: (c.tier, -c.priority))
    return out


def spread_out(order: list[int], tiers: list[int], vectors: np.ndarray, n: int) -> list[int]:
    """`n` indices: tier by tier, each next pick the farthest from those already picked."""
    picked: list[int] = []
    if not order:
        return picked
    nearest = np.full(len(vectors), np.inf)
    left = list(order)
    while left and len(picked) < n:
        tier = min(tiers[i] for i in left)
        pool = [i for i in left if tiers[i] == tier]
        # The first of a tier is its top priority; then the farthest from every pick so far.
        starts = not picked or tiers[picked[-1]] != tier
        best = pool[0] if starts else max(pool, key=lambda i: nearest[i])
        picked.append(best)
        left.remove(best)
        nearest = np.minimum(nearest, np.linalg.norm(vectors - vectors[best], axis=1))
    return picked


def _feature_vectors(model: Path, paths: list[str]) -> np.ndarray:
    """The normalised pre-logits vector of each image, from the model that classified them."""
    predictor = load_predictor(model, provider="cpu")
    manifest = read_manifest(model if model.is_dir() else model.parent)
    if manifest.onnx is None or not manifest.onnx.features:
        raise UsageError(f"{model} has no features output; rebuild it to select by spread")
    rows = []
    for i in range(0, len(paths), 32):
        imgs = []
        for p in paths[i : i + 32]:
            src = io.BytesIO(read_bytes(p)) if is_url(p) else p
            imgs.append(predictor.preprocess(load_rgb(src)))  # type: ignore[arg-type]
        _, f = predictor.logits_and_features(np.stack(imgs))
        if f is None:
            raise UsageError(f"{predictor.artifact.name} has no features output")
        rows.append(split_blocks(f, manifest.onnx.features["layout"])[0])
    x = np.concatenate(rows).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def select(results: str, model: Path, n: int, out: Path, copy: bool = False) -> list[Candidate]:
    """Write `out`/selection.csv and `out`/images/ (links, or copies): the `n` picks."""
    if n < 1:
        raise UsageError("--n must be at least 1")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty; name a new folder for the selection")
    ranked = candidates(read_results(results))
    if not ranked:
        raise UsageError(f"{results} holds no classified image to select from")
    pool = ranked[: n * POOL]
    vectors = _feature_vectors(model, [c.path for c in pool])
    tiers = [c.tier for c in pool]
    picks = [pool[i] for i in spread_out(list(range(len(pool))), tiers, vectors, n)]
    # Made beside `out` and renamed at the end: a file that cannot be read (deleted since
    # classify, an object-storage error) leaves no half-made selection that refuses a retry.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write_selection(tmp, picks, copy)
        if out.exists():
            out.rmdir()  # empty: checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return picks


def _write_selection(out: Path, picks: list[Candidate], copy: bool) -> None:
    images = out / "images"
    images.mkdir()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "path", "file", "reason", "label", "score", "novelty", "ok_score"])
    for rank, c in enumerate(picks, 1):
        name = f"{rank:04d}_{c.path.rstrip('/').rsplit('/', 1)[-1]}"
        dst = images / name
        if is_url(c.path):
            with atomic_path(dst) as tmp:
                tmp.write_bytes(read_bytes(c.path))
        elif copy:
            shutil.copyfile(c.path, dst)
        else:
            dst.symlink_to(Path(c.path).resolve())
        r = c.row
        w.writerow([rank, c.path, f"images/{name}", c.reason, r["label"], r["score"],
                    r.get("novelty"), r.get("ok_score")])  # fmt: skip
    write_text(out / SELECTION_CSV, buf.getvalue())
