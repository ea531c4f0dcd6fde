"""Throughput of `tlbuild classify` on 640x480 JPEGs, against its parts and a naive loop.

Prints, all measured in this one run on this machine:
  D  decode-only rate: classify's decode threads alone (read, JPEG decode, resize, normalise)
  I  inference-only rate: the best CPU artifact on already-decoded batches
  H  1 / (1/D + 1/I): the rate if decode and inference shared the cores perfectly
  E  end-to-end rate of classify() itself, Parquet file included
  N  a plain loop: PIL opens each image, the PyTorch model.pt classifies it, one at a time
Targets (issue 4): E >= 0.8 H and E >= 10 N. Exit status 1 if either is missed.

    python benchmarks/classify_throughput.py --model exports/defects --images 2000
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from tlbuild.bench.environment import cpu_cores
from tlbuild.classify.rows import decode_batch
from tlbuild.classify.run import ClassifyOptions, classify
from tlbuild.data.synth import CLASSES, _render
from tlbuild.runtime.load import load_predictor


def _write_one(args: tuple[Path, int]) -> None:
    folder, i = args
    path = folder / f"img_{i:05d}.jpg"
    if path.exists():
        return
    # The demo surfaces rendered at 640 and cut to 640x480: a camera frame's shape.
    rgb = _render(1, i % len(CLASSES), i, 640)[80:560]
    tmp = path.with_suffix(".tmp")
    Image.fromarray(rgb).save(tmp, "JPEG", quality=90)
    tmp.rename(path)


def make_images(folder: Path, n: int) -> list[Path]:
    """At least n 640x480 JPEGs in folder (kept between runs: generating takes a minute)."""
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(cpu_cores()) as pool:
        list(pool.map(_write_one, [(folder, i) for i in range(n)], chunksize=16))
    return sorted(folder.glob("img_*.jpg"))[:n]


def decode_rate(paths: list[Path], spec, batch: int, workers: int) -> float:  # noqa: ANN001
    """D: the same batched thread-pool decode classify uses, with nothing else running."""
    strs = [str(p) for p in paths]
    chunks = [strs[i : i + batch] for i in range(0, len(strs), batch)]
    with ThreadPoolExecutor(workers) as pool:
        # The decode classify runs by default (the full one), so E is held to the same work.
        exact = ClassifyOptions().exact_decode
        list(pool.map(lambda c: decode_batch(c, spec, exact), chunks[:2]))  # warm-up
        t = time.perf_counter()
        list(pool.map(lambda c: decode_batch(c, spec, exact), chunks))
        return len(strs) / (time.perf_counter() - t)


def inference_rate(predictor, paths: list[Path], batch: int, n: int) -> float:  # noqa: ANN001
    """I: predictor.predict on batches decoded beforehand (a few distinct ones, cycled)."""
    batches = [
        decode_batch([str(p) for p in paths[i : i + batch]], predictor.preprocessing, True)
        for i in range(0, 8 * batch, batch)
    ]
    xs = [b.batch for b in batches]
    predictor.predict(xs[0])  # warm-up
    done, t = 0, time.perf_counter()
    for x in itertools.cycle(xs):
        predictor.predict(x)
        done += len(x)
        if done >= n:
            break
    return done / (time.perf_counter() - t)


def decode_agreement(predictor, paths: list[Path], batch: int) -> tuple[float, float]:  # noqa: ANN001
    """Top-1 agreement and max |p difference| between the fast (draft) and the exact decode."""
    same, worst, total = 0, 0.0, 0
    for i in range(0, len(paths), batch):
        chunk = [str(p) for p in paths[i : i + batch]]
        fast = predictor.predict(decode_batch(chunk, predictor.preprocessing, False).batch)
        exact = predictor.predict(decode_batch(chunk, predictor.preprocessing, True).batch)
        same += int((fast.argmax(1) == exact.argmax(1)).sum())
        worst = max(worst, float(np.abs(fast - exact).max()))
        total += len(chunk)
    return same / total, worst


def naive_rate(model_pt: Path, paths: list[Path]) -> float:
    """N: open with PIL, training preprocessing, PyTorch model, one image at a time."""
    import torch

    from tlbuild.data.preprocess import preprocess
    from tlbuild.models.checkpoint import load_trained

    tm = load_trained(model_pt)
    model = tm.model.eval()
    with torch.inference_mode():
        for p in paths[:5]:  # warm-up
            model(
                torch.from_numpy(preprocess(Image.open(p).convert("RGB"), tm.preprocessing))[None]
            )
        t = time.perf_counter()
        for p in paths:
            x = preprocess(Image.open(p).convert("RGB"), tm.preprocessing)
            model(torch.from_numpy(x)[None]).softmax(1)
        return len(paths) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("exports/defects"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--folder", type=Path, default=Path("data/bench-640x480"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--naive-images", type=int, default=300)
    args = ap.parse_args()
    if not (args.model / "manifest.json").is_file():
        print(
            f"{args.model} is not an export folder; build one first:\n"
            "  tlbuild data synth-defects data/demo && tlbuild run recipes/defects.toml"
        )
        return 2

    print(f"Generating / reusing {args.images} 640x480 JPEGs in {args.folder} ...", flush=True)
    paths = make_images(args.folder, args.images)
    cores = cpu_cores()
    predictor = load_predictor(args.model, threads=cores, spinning=False)
    spec = predictor.preprocessing
    print(
        f"model {predictor.artifact.name} ({predictor.backend}), input "
        f"{spec.input_size[1]}x{spec.input_size[0]}, batch {args.batch_size}, {cores} cores"
    )

    d = decode_rate(paths, spec, args.batch_size, cores)
    i = inference_rate(predictor, paths, args.batch_size, len(paths))
    h = 1.0 / (1.0 / d + 1.0 / i)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ClassifyOptions(batch_size=args.batch_size, overwrite=True)
        s = classify([str(args.folder)], args.model, Path(tmp) / "r.parquet", opts)
        assert s.rows == len(paths) and s.errors == 0, (s.rows, s.errors)
        e = s.rate
    n = naive_rate(args.model / "model.pt", paths[: args.naive_images])
    agree, worst = decode_agreement(predictor, paths[:500], args.batch_size)

    print(f"D decode only        {d:8.0f} img/s")
    print(f"I inference only     {i:8.0f} img/s")
    print(f"H 1/(1/D+1/I)        {h:8.0f} img/s")
    print(f"E classify, end-end  {e:8.0f} img/s")
    print(f"N naive PIL+torch    {n:8.1f} img/s")
    print(
        f"fast vs exact JPEG decode on {min(500, len(paths))} images: top-1 agreement "
        f"{agree:.1%}, max |p difference| {worst:.3f}"
    )
    ok_h, ok_n = e >= 0.8 * h, e >= 10 * n
    print(f"E / H = {e / h:.2f}  (target >= 0.80)  {'PASS' if ok_h else 'FAIL'}")
    print(f"E / N = {e / n:.1f}  (target >= 10)    {'PASS' if ok_n else 'FAIL'}")
    return 0 if ok_h and ok_n else 1


if __name__ == "__main__":
    sys.exit(main())
