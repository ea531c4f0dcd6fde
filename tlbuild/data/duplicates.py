"""Exact and near-duplicate images: the same picture twice in a split, across splits, or classes.

Near duplicates are found with a 64-bit perceptual hash (pHash), not with embeddings of the
pretrained body. The field does both: cleanvision hashes (pHash/dHash), fastdup embeds.
Embeddings also catch crops and recolourings, but cost a forward pass per image (the forward
half of a training epoch) and need the model before the data is trusted. The hash is computed
from the decode the dataset scan already makes of every file (scan.py), costs a fraction of a
millisecond per image, needs no model and no network, and catches what leaks in practice: the
same photograph re-saved, resized, re-encoded or re-exposed. Costs and the default threshold
are measured in benchmarks/duplicates_cost.py and benchmarks/duplicates_threshold.py.

Exact duplicates are files with the same bytes: a sha256 over the files that share a pHash and
a size (identical bytes always decode to the same hash), so only candidates are read again.

The pair search is bounded for large sets: two 64-bit hashes within `k` bits agree exactly on
at least one of `k + 1` disjoint bands of their bits (pigeonhole), so only hashes sharing a band
value are compared. Where the bands are too narrow to separate the hashes (large `k`), a
vectorised all-pairs comparison in blocks is used instead, whichever the bucket sizes say is
cheaper.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tlbuild.fileio import sha256_file

HASH_BITS = 64
_SIDE = 32  # pHash's thumbnail: 32x32 grey, of which the 8x8 lowest DCT frequencies are kept
_LOW = 8
# DCT-II rows 0..7 for 32 samples, scaled as scipy.fftpack.dct (norm=None), so the bits are
# those of the `imagehash` package's phash and published thresholds carry over.
_DCT = 2 * np.cos(np.pi * np.arange(_LOW)[:, None] * (2 * np.arange(_SIDE) + 1) / (2 * _SIDE))
_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)

SPLIT_ORDER = ("train", "val", "test")
# Most harmful first: one image under two labels, then a validation/test image seen in training.
RELATIONS = ("label conflict", "split leak", "within split")


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash of an image: 32x32 grey, 2-D DCT, low 8x8 above their median."""
    grey = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    low = _DCT @ np.asarray(grey, np.float64) @ _DCT.T
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POP8[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def band_keys(h: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """The hashes' values on `max_distance + 1` disjoint bands of bits, bits interleaved
    (band j holds bits j, j + bands, ...): pHash's few biased bits (the DC term is nearly always
    set) then spread over every band instead of crowding one, whose buckets would grow."""
    n_bands = max_distance + 1
    keys = [np.zeros(len(h), np.uint64) for _ in range(n_bands)]
    for bit in range(HASH_BITS):
        t, j = divmod(bit, n_bands)
        keys[j] |= ((h >> np.uint64(bit)) & np.uint64(1)) << np.uint64(t)
    return keys


def _band_candidates(h: np.ndarray, key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) sharing `key` with distance <= k: each bucket's members, compared by offset
    in key order (a bucket is contiguous there, so the rows still in one shrink at each step)."""
    order = np.argsort(key, kind="stable")
    ks = key[order]
    pos = np.flatnonzero(ks[1:] == ks[:-1])
    found_a, found_b = [], []
    step = 1
    while pos.size:
        a, b = order[pos], order[pos + step]
        keep = popcount(h[a] ^ h[b]) <= k
        found_a.append(np.minimum(a, b)[keep])
        found_b.append(np.maximum(a, b)[keep])
        step += 1
        pos = pos[pos + step < len(ks)]
        pos = pos[ks[pos] == ks[pos + step]]
    if not found_a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(found_a), np.concatenate(found_b)


def _block_candidates(h: np.ndarray, k: int, block_elems: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) with distance <= k, compared in blocks of rows against later rows."""
    n = len(h)
    found_a, found_b = [], []
    start = 0
    while start < n:
        rows = max(1, min(n - start, block_elems // max(1, n - start)))
        d = popcount(h[start : start + rows, None] ^ h[None, start:])
        ii, jj = np.nonzero(d <= k)
        ii, jj = ii + start, jj + start
        later = jj > ii
        found_a.append(ii[later])
        found_b.append(jj[later])
        start += rows
    return np.concatenate(found_a), np.concatenate(found_b)


def near_pairs(
    hashes: np.ndarray, max_distance: int, method: str = "auto", block_elems: int = 1 << 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of `hashes` (uint64) within `max_distance` bits: i, j and distance,
    sorted by (i, j). `method`: "bands", "blocks" or "auto" (the cheaper by bucket sizes)."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n, k = len(h), int(max_distance)
    if not 0 <= k < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS - 1}], got {k}")
    empty = np.empty(0, np.int64)
    if n < 2:
        return empty, empty, empty
    keys = band_keys(h, k)
    if method == "auto":
        # Comparisons each way: sum over bands of bucket pairs, against all n^2 / 2 pairs
        # (the banded ones cost a few times more per comparison: sorting, gathers).
        banded = sum(float((c * (c - 1.0)).sum()) / 2 for c in map(_bucket_sizes, keys))
        method = "bands" if 4 * banded < n * (n - 1) / 2 else "blocks"
    if method == "bands":
        parts = [_band_candidates(h, key, k) for key in keys]
        a = np.concatenate([p[0] for p in parts])
        b = np.concatenate([p[1] for p in parts])
        # A pair sharing several bands was found once per band.
        a, b = np.divmod(np.unique(a.astype(np.int64) * n + b), n)
    elif method == "blocks":
        a, b = _block_candidates(h, k, block_elems)
        order = np.lexsort((b, a))
        a, b = a[order].astype(np.int64), b[order].astype(np.int64)
    else:
        raise ValueError(f"method must be 'auto', 'bands' or 'blocks', got {method!r}")
    return a, b, popcount(h[a] ^ h[b]).astype(np.int64)


def _bucket_sizes(key: np.ndarray) -> np.ndarray:
    return np.unique(key, return_counts=True)[1].astype(np.float64)


def exact_groups(paths: Sequence[Path]) -> list[int]:
    """A group number per path, equal for files with the same bytes: sizes first, then sha256
    of the files whose size another one shares (as fdupes does), so most files are not read."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        try:
            by_size[Path(p).stat().st_size].append(i)
        except OSError:
            continue  # gone since the scan read it: a copy of nothing
    group = list(range(len(paths)))
    for members in by_size.values():
        if len(members) < 2:
            continue
        first: dict[str, int] = {}
        for i in members:
            digest = _sha256(paths[i])
            if digest is not None:
                group[i] = first.setdefault(digest, i)
    return group


def _sha256(path: Path) -> str | None:
    """The file's sha256, or None if it is no longer a readable regular file (never blocks)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


@dataclass(frozen=True)
class Entry:
    """One image the build uses: where it is, its split and its class."""

    path: Path
    split: str
    label: str


@dataclass(frozen=True)
class Pair:
    """Two images that are the same picture: byte for byte (`exact`) or by their pHash."""

    a: Entry
    b: Entry
    kind: str  # "exact" or "near"
    distance: int  # pHash bits that differ (0 for exact)

    @property
    def relation(self) -> str:
        """label conflict (two classes), split leak (one class, two splits), within split."""
        if self.a.label != self.b.label:
            return "label conflict"
        return "split leak" if self.a.split != self.b.split else "within split"


def _priority(p: Pair) -> tuple[int, int, int, str, str]:
    return (
        RELATIONS.index(p.relation),
        p.kind != "exact",
        p.distance,
        str(p.a.path),
        str(p.b.path),
    )


def find_duplicates(entries: Sequence[Entry], hashes: np.ndarray, max_distance: int) -> list[Pair]:
    """Duplicate pairs among `entries` (with their pHashes), label conflicts and leaks first.

    A set of copies is listed as pairs with its first file (train before val before test), so
    every file that has a duplicate is named once, and N copies make N - 1 pairs, not N^2 / 2.
    Files with the same bytes pair as "exact"; other files with the same pHash pair with the set's
    first file at distance 0; sets whose hashes differ by at most `max_distance` bits pair
    through their first files.
    """
    order = sorted(
        range(len(entries)),
        key=lambda i: (SPLIT_ORDER.index(entries[i].split), str(entries[i].path)),
    )
    ents = [entries[i] for i in order]
    h = np.asarray(hashes, np.uint64)[order]
    uniq, inverse = np.unique(h, return_inverse=True)
    members: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(inverse.tolist()):
        members[u].append(i)  # in `order`, so each set's first file is its member 0
    pairs: list[Pair] = []
    for group in (m for m in members.values() if len(m) > 1):
        same_bytes = exact_groups([ents[i].path for i in group])
        firsts = []
        for pos, i in enumerate(group):
            rep = group[same_bytes[pos]]
            if rep == i:
                firsts.append(i)
            else:
                pairs.append(Pair(ents[rep], ents[i], "exact", 0))
        pairs += [Pair(ents[firsts[0]], ents[i], "near", 0) for i in firsts[1:]]
    if max_distance > 0:
        ua, ub, ud = near_pairs(uniq, max_distance)
        first = {u: m[0] for u, m in members.items()}
        for u, v, d in zip(ua.tolist(), ub.tolist(), ud.tolist(), strict=True):
            i, j = sorted((first[u], first[v]))  # train's file first, as in the sets
            pairs.append(Pair(ents[i], ents[j], "near", d))
    return sorted(pairs, key=_priority)
