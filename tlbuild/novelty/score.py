"""The novelty score: how far an image's features lie from the training images'. Pure numpy.

One Gaussian per block of the features row (export/features.py: the pre-logits vector, then
each feature map's per-channel mean and standard deviation), fitted on the training images
with Ledoit-Wolf shrinkage (a few hundred images against up to 256 dimensions). A block wider
than MAX_DIMS is first projected on its MAX_DIMS leading principal directions. An image's
distance for a block (squared Mahalanobis) is standardised on the validation images: z = (log
distance - its validation mean) / its validation spread, so every block's typical range is the
same whatever its width or tail. The novelty score is log(sum(exp(z))), a smooth maximum: the
block furthest out decides (a dark frame is far in the early maps' blocks, an unseen object in
the pre-logits one), and several blocks a little out add up. Chosen by measurement: on the demo
and the accuracy suite's sets this beat the softmax probability, energy, a Gaussian or k-nearest
neighbours on the pre-logits vector alone, and ViM; and on the demo the smooth maximum of
standardised blocks flagged 97-100% of dark, over-exposed, half-covered and off-centre frames
where the largest median-scaled distance flagged 78-97%, with INT8 flagging as FP32 on 99.7% of
images against 98.4% (benchmarks/novelty.py prints the tables).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.errors import UsageError
from tlbuild.fileio import atomic_path

MAX_DIMS = 256
MIN_SPREAD = 0.1
METHOD = "feature-gaussian-v2"


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS on one thread while classify scores: OpenBLAS's threads spin after each
    product and took 20% of classify's rows per second from ONNX Runtime and the decoders on 2
    cores (0.77x with the score against 0.98x on one BLAS thread). No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a hand-made device install without it: slower, not wrong
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and shrunk covariance of the rows of `x` (Ledoit and Wolf, 2004)."""
    n, p = x.shape
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / n
    mu = np.trace(cov) / p
    x2 = xc**2
    beta_ = float(np.sum(x2.T @ x2)) / n
    delta_ = float(np.sum(cov**2))
    beta = min((beta_ - delta_) / (p * n), (delta_ - 2 * mu * np.trace(cov) + p * mu**2) / p)
    delta = (delta_ - 2 * mu * np.trace(cov) + p * mu**2) / p
    shrink = 0.0 if delta <= 0 else float(np.clip(beta / delta, 0.0, 1.0))
    return mean, (1 - shrink) * cov + shrink * mu * np.eye(p)


@dataclass
class Block:
    """One block's Gaussian: its place in the row, projection (or None), mean, precision."""

    name: str
    start: int
    width: int
    mean: np.ndarray
    precision: np.ndarray
    projection: np.ndarray | None = None
    loc: float = 0.0  # mean of log distance on the validation images
    spread: float = 1.0  # its standard deviation there

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row."""
        x = features[:, self.start : self.start + self.width].astype(np.float64)
        if self.projection is not None:
            x = x @ self.projection
        d = x - self.mean
        with np.errstate(invalid="ignore", over="ignore"):  # a broken row: scores() flags it
            return ((d @ self.precision) * d).sum(1)  # a BLAS product: einsum is 20x slower

    def z(self, features: np.ndarray) -> np.ndarray:
        """Log distance standardised on the validation images."""
        return (np.log(np.maximum(self.distances(features), 1e-12)) - self.loc) / self.spread


def _fit_block(name: str, start: int, x: np.ndarray) -> Block:
    width = x.shape[1]
    projection = None
    # Never more directions than the images can estimate.
    keep = min(MAX_DIMS, max(1, len(x) - 1))
    if width > keep:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = vt[:keep].T
        x = x @ projection
    mean, cov = ledoit_wolf(x)
    # A constant channel (a feature that never fires) has no variance; a floor keeps the
    # inverse finite without letting it dominate.
    cov += np.eye(len(cov)) * max(1e-9, 1e-6 * float(np.trace(cov)) / len(cov))
    return Block(name, start, width, mean, np.linalg.inv(cov), projection)


@dataclass
class NoveltyModel:
    """The fitted blocks and the threshold the build chose (None until chosen)."""

    blocks: list[Block]
    threshold: float | None = None

    @classmethod
    def fit(cls, train: np.ndarray, layout: Sequence[dict[str, Any]]) -> NoveltyModel:
        """Gaussians per block of `layout` on training features (rows: images)."""
        if len(train) < 2:
            raise UsageError("the novelty score needs at least 2 training images")
        train = train.astype(np.float64)
        blocks, start = [], 0
        for b in layout:
            width = int(b["width"])
            blocks.append(_fit_block(str(b["name"]), start, train[:, start : start + width]))
            start += width
        return cls(blocks)

    def block_z(self, features: np.ndarray) -> np.ndarray:
        """(images, blocks) standardised log distances."""
        return np.stack([b.z(features) for b in self.blocks], 1)

    def standardise_on(self, val: np.ndarray) -> None:
        """Set each block's location and spread from the validation features."""
        for b in self.blocks:
            logs = np.log(np.maximum(b.distances(val), 1e-12))
            # Floored at 0.1 (a factor of 1.1 in distance): with one or two validation images
            # the spread is ~0 and every image would be "novel" by a rounding error.
            b.loc, b.spread = float(logs.mean()), max(float(logs.std()), MIN_SPREAD)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The novelty score of each row: log(sum(exp(z))) over its blocks."""
        z = self.block_z(features)
        # A feature that overflowed (an FP16 engine) or is NaN is as far out as it gets: such
        # an image must be flagged, never pass because NaN > threshold is False.
        z = np.nan_to_num(z, nan=np.inf, posinf=np.inf, neginf=-np.inf)
        top = z.max(1)
        with np.errstate(invalid="ignore"):
            out = top + np.log(np.exp(z - top[:, None]).sum(1))
        return np.where(np.isinf(top) & (top > 0), np.inf, out)

    def flags(self, features: np.ndarray) -> np.ndarray:
        """Scores over the threshold."""
        if self.threshold is None:
            raise UsageError("the novelty threshold is not chosen yet")
        return self.scores(features) > self.threshold

    def save(self, path: Path) -> None:
        """Write an .npz (atomically) with everything scoring needs."""
        arrays: dict[str, Any] = {
            "method": np.array(METHOD),
            "threshold": np.array(np.nan if self.threshold is None else self.threshold),
            "names": np.array([b.name for b in self.blocks]),
            "starts": np.array([b.start for b in self.blocks]),
            "widths": np.array([b.width for b in self.blocks]),
            "locs": np.array([b.loc for b in self.blocks]),
            "spreads": np.array([b.spread for b in self.blocks]),
        }
        for i, b in enumerate(self.blocks):
            arrays[f"mean{i}"] = b.mean.astype(np.float32)
            arrays[f"precision{i}"] = b.precision.astype(np.float32)
            if b.projection is not None:
                arrays[f"projection{i}"] = b.projection.astype(np.float32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> NoveltyModel:
        """Read what save wrote; a file of another method or a damaged one is refused."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["method"]) != METHOD:
                    raise UsageError(
                        f"{path} holds novelty method {z['method']}, this tlbuild reads "
                        f"{METHOD}; rebuild the export folder"
                    )
                blocks = []
                for i, name in enumerate(z["names"]):
                    projection = z.get(f"projection{i}")
                    blocks.append(
                        Block(
                            str(name),
                            int(z["starts"][i]),
                            int(z["widths"][i]),
                            z[f"mean{i}"].astype(np.float64),
                            z[f"precision{i}"].astype(np.float64),
                            None if projection is None else projection.astype(np.float64),
                            float(z["locs"][i]),
                            float(z["spreads"][i]),
                        )
                    )
                t = float(z["threshold"])
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"cannot read {path} ({type(e).__name__}: {e}); copy it again") from e
        return cls(blocks, None if np.isnan(t) else t)


def conformal_threshold(val_scores: np.ndarray, target: float) -> tuple[float, float]:
    """The threshold that flags at most `target` of new images like the validation ones (split
    conformal: above the ceil((n + 1)(1 - target))-th smallest validation score), and the share
    it flags on validation. With fewer than 2/target - 1 images (99 at 2%) that is the largest.

    It sits halfway to the next score, or half the last gap above the largest: a threshold
    equal to one image's score would flip that image between FP32 and a variant whose score
    differs in the last digit."""
    s = np.sort(np.asarray(val_scores, np.float64))
    n = len(s)
    k = min(n, int(np.ceil((n + 1) * (1 - target))))
    at = float(s[k - 1])
    if k < n:
        threshold = (at + float(s[k])) / 2
    else:
        gap = at - float(s[-2]) if n > 1 else 0.0
        threshold = at + max(gap, 1e-6) / 2
    return threshold, float((s > threshold).mean())
