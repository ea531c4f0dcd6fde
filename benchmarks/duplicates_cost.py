"""What the duplicate check (data.duplicates) costs on 100,000 images, against a training epoch.

    python benchmarks/duplicates_cost.py                    # 100,000 images, 160 px JPEGs
    python benchmarks/duplicates_cost.py --images 20000 --size 640 --no-train

1. Hashing: the dataset scan already decodes every file (scan.find_unreadable); the check adds
   a pHash of that decode. Timed on N files (hard links to a few hundred distinct demo JPEGs,
   so the page cache holds them: this is the CPU cost, not the disk's), the scan with and
   without the hash.
2. Pair search on N hashes: uniform random ones and "clustered" ones (each a real demo image's
   hash with 12 random bits flipped, so bits are as biased and correlated as real pHashes),
   each with planted near duplicates at 0..max distance, at several thresholds; the planted
   pairs must all be found. Then the whole check (find_duplicates) on the N hard links, where
   every file has copies: the worst case for the exact (sha256) confirmation.
3. One training epoch on N images on this machine, from the rate of a few training steps of the
   default backbone (--no-train to skip), and the check's share of it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlbuild.data.duplicates import Entry, find_duplicates, near_pairs, phash
from tlbuild.data.scan import find_unreadable
from tlbuild.data.synth import CLASSES, _render


def make_tree(root: Path, n: int, distinct: int, size: int) -> list[Path]:
    """n JPEG paths under root (1,000 per folder): hard links to `distinct` rendered files."""
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(distinct):
        img = Image.fromarray(_render(3, i % len(CLASSES), i, min(size, 160)))
        img.resize((size, size), Image.Resampling.BICUBIC).save(src / f"{i}.jpg", quality=90)
    paths = []
    for i in range(n):
        d = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir()
        p = d / f"img_{i:06d}.jpg"
        os.link(src / f"{i % distinct}.jpg", p)
        paths.append(p)
    return paths


def time_scan(paths: list[Path]) -> tuple[float, float, dict[Path, int]]:
    """Seconds of the scan's decode pass without and with the pHash, and the hashes."""
    t = time.perf_counter()
    find_unreadable(paths)
    plain = time.perf_counter() - t
    hashes: dict[Path, int] = {}
    t = time.perf_counter()
    find_unreadable(paths, on_decoded=lambda p, img: hashes.__setitem__(p, phash(img)))
    return plain, time.perf_counter() - t, hashes


def planted(base: np.ndarray, rng: np.random.Generator, count: int, most: int) -> np.ndarray:
    """`base` with `count` hashes replaced by copies of others, 0..most bits flipped."""
    h = base.copy()
    src = rng.choice(len(h), count, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(len(h)), src), count, replace=False)
    for s, d in zip(src, dst, strict=True):
        x = int(h[s])
        for bit in rng.choice(64, int(rng.integers(0, most + 1)), replace=False):
            x ^= 1 << int(bit)
        h[d] = x
    return h


def time_search(name: str, h: np.ndarray, thresholds: list[int]) -> None:
    """near_pairs at each threshold; checks every pair against a blocked brute force at 4."""
    for k in thresholds:
        t = time.perf_counter()
        a, b, _ = near_pairs(h, k)
        secs = time.perf_counter() - t
        print(f"  {name:<10} t={k:<2} {secs:7.2f} s   {len(a):>8,} pairs", flush=True)
        if k == 4:
            t = time.perf_counter()
            ba, bb, _ = near_pairs(h, k, method="blocks")
            brute = time.perf_counter() - t
            same = np.array_equal(a, ba) and np.array_equal(b, bb)
            print(f"  {name:<10} t=4  {brute:7.2f} s   all pairs compared (same pairs: {same})")


def train_rate(size: int, steps: int = 5, batch: int = 32) -> float:
    """Images per second of full fine-tuning steps of the default backbone at `size` px."""
    import torch

    from tlbuild.models.factory import make_model
    from tlbuild.recipe import ModelConfig

    cfg = ModelConfig.model_validate({"preprocess": {"input_size": size, "resize": "resize"}})
    model = make_model(cfg, len(CLASSES), None).model.train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, len(CLASSES), (batch,))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--distinct", type=int, default=400, help="distinct files hard-linked")
    ap.add_argument("--size", type=int, default=160, help="image side in px")
    ap.add_argument("--train-size", type=int, default=160, help="input px of the training rate")
    ap.add_argument("--no-train", action="store_true", help="skip the training-rate measure")
    args = ap.parse_args()
    n = args.images
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{n:,} files, {args.size} px JPEG ({args.distinct} distinct, hard-linked)")
        paths = make_tree(Path(tmp), n, args.distinct, args.size)
        plain, hashed, by_path = time_scan(paths)
        extra = hashed - plain
        print(
            f"Scan decode pass: {plain:.1f} s; with the pHash: {hashed:.1f} s "
            f"(+{extra:.1f} s, {extra / n * 1e6:.0f} us per image)"
        )
        real = np.array([by_path[p] for p in paths[: args.distinct]], np.uint64)

        print(f"Pair search on {n:,} hashes, 1,000 planted near duplicates (0-10 bits):")
        uniform = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        children = real[rng.integers(0, len(real), n)]
        for _ in range(12):
            children ^= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        thresholds = [0, 2, 4, 6, 8, 10]
        for name, base in (("uniform", uniform), ("clustered", children)):
            h = planted(base, rng, 1000, 10)
            time_search(name, h, thresholds)

        entries = [Entry(p, "train", "a") for p in paths]
        hashes = np.array([by_path[p] for p in paths], np.uint64)
        t = time.perf_counter()
        pairs = find_duplicates(entries, hashes, 4)
        check = time.perf_counter() - t
        print(
            f"Whole check on the {n:,} files (every file has copies, so every one is "
            f"sha256-confirmed): {check:.1f} s, {len(pairs):,} pairs"
        )

    if not args.no_train:
        side = args.train_size
        rate = train_rate(side)
        epoch = n / rate
        cost = extra + check
        print(
            f"Training at {side} px here: {rate:.1f} img/s, so one epoch of {n:,} images "
            f"takes {epoch:,.0f} s; the check adds {cost:.1f} s ({cost / epoch:.2%} of one epoch)"
        )


if __name__ == "__main__":
    main()
