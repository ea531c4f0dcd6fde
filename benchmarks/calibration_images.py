"""How many INT8 calibration images are enough: where the activation ranges stop moving.

    python benchmarks/calibration_images.py exports/defects
    python benchmarks/calibration_images.py exports/defects --methods percentile minmax entropy
    python benchmarks/calibration_images.py --suite textures scenes   # trains each set first
    python benchmarks/calibration_images.py exports/defects --sizes 16 32 64 --independent

Per export folder (its model.onnx, splits.json and manifest), calibration sets of n = 32, 64,
128, 256, 512 training images (capped at the training split) are drawn. By default they are
nested: one seeded draw of the largest n with `calibration_samples` (what the quantize stage
uses), ordered so that every prefix keeps each class's share, and each smaller n is a prefix
of it, so a difference between two n is the images added, not a different draw. With
`--independent` each n is its own `calibration_samples(train, n, seed)` draw instead.

For each method (--methods; percentile by default) and each n, the ranges are collected once
with tlbuild's `Calibration` (timed), int8_cpu and int8_trt are made from them with the
recipe's default settings (keep_float first_conv and classifier, reduce_range on, percentile
99.999, trt_float fp16), and both are run on the validation split as the gate runs them
(int8_trt with Q/DQ simulated). One table per folder, one row per method and n:

- range width moves: the median and 95th percentile, over every calibrated tensor, of
  |width(n) - width(largest n)| / width(largest n), width being high - low of its range;
- calib s: seconds the collection of the ranges took (the cost that is linear in n);
- per variant: answers changed against FP32 (count and % of the validation split), the
  accuracy drop against FP32 in points, answers that differ from the same variant calibrated
  on the largest n, and the mean |logit - FP32 logit| (finer than answers where none change).

With --suite, the accuracy suite's sets (benchmarks/accuracy/datasets.py) are built under
--data-root and trained and exported with tlbuild's defaults (seed 0, as
benchmarks/int8_accuracy.py does) into --work, where a finished export is reused next time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "accuracy"))

from tlbuild.artifacts import MODEL_ONNX, VARIANTS  # noqa: E402
from tlbuild.data.preprocess import Preprocessing, load_batch  # noqa: E402
from tlbuild.data.scan import Sample  # noqa: E402
from tlbuild.data.splits_file import read_split  # noqa: E402
from tlbuild.export.calibration import Calibration  # noqa: E402
from tlbuild.export.quantize import Int8Job, Int8Settings, make_int8  # noqa: E402
from tlbuild.manifest import read_manifest  # noqa: E402
from tlbuild.recipe import QuantizeConfig  # noqa: E402
from tlbuild.runtime.backends import open_onnx  # noqa: E402
from tlbuild.stages.quantize import calibration_samples  # noqa: E402

SIZES = (32, 64, 128, 256, 512)
METHODS = ("percentile", "minmax", "entropy")
INT8 = ("int8_cpu", "int8_trt")
BATCH = 32  # the gate's batch size
REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / "data" / "bench-accuracy"
SUITE_SIZES = {"textures": 128, "scenes": 128, "faces": 128, "demo": 160}


@dataclass
class Answers:
    """One INT8 variant's answers on the validation split, against FP32."""

    top1: np.ndarray
    changed: int  # answers that differ from FP32's
    drop: float  # accuracy points below FP32
    logit_error: float  # mean |logit - FP32 logit|


def nested_order(picked: list[Sample], seed: int) -> list[Sample]:
    """`picked` in an order whose every prefix keeps each class's share: each class shuffled,
    its j-th of m images placed at (j + 0.5) / m, the classes merged by that position."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for sm in picked:
        by_class.setdefault(sm.label, []).append(sm)
    keyed: list[tuple[float, float, Sample]] = []
    for group in by_class.values():
        order = rng.permutation(len(group))
        keyed += [((j + 0.5) / len(group), rng.random(), group[i]) for j, i in enumerate(order)]
    return [sm for _, _, sm in sorted(keyed, key=lambda t: (t[0], t[1]))]


def draws(
    train: list[Sample], sizes: list[int], seed: int, nested: bool
) -> dict[int, list[Sample]]:
    """The calibration images for each n: prefixes of one draw of the largest, or independent
    `calibration_samples` draws."""
    if not nested:
        return {n: calibration_samples(train, n, seed) for n in sizes}
    largest = nested_order(calibration_samples(train, max(sizes), seed), seed)
    return {n: largest[:n] for n in sizes}


def widths(cache: Path) -> dict[str, float]:
    """Each tensor's range width (high - low) in an ONNX Runtime calibration cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    out = {}
    for name, t in load_tensors_data(cache).data.items():
        low, high = t.range_value
        out[name] = float(np.max(high) - np.min(low))
    return out


def width_moves(w: dict[str, float], ref: dict[str, float]) -> tuple[float, float, int]:
    """Median and 95th percentile of |w - ref| / ref over the tensors both calibrated (ref > 0),
    and how many tensors that is."""
    common = [k for k in ref if k in w and ref[k] > 1e-12]
    rel = np.array([abs(w[k] - ref[k]) / ref[k] for k in common])
    if not len(rel):
        return float("nan"), float("nan"), 0
    return float(np.median(rel)), float(np.percentile(rel, 95)), len(common)


def answers(
    path: Path, variant: str, x: np.ndarray, labels: np.ndarray, fp32: np.ndarray
) -> Answers:
    """`path`'s answers on the validation images (FP32's logits `fp32`), run as the gate runs
    `variant`."""
    model = open_onnx(path, simulate_qdq=VARIANTS[variant].simulate_qdq)
    logits = model.logits_in_batches(x, BATCH)
    top1, fp32_top1 = logits.argmax(1), fp32.argmax(1)
    drop = 100.0 * (float((fp32_top1 == labels).mean()) - float((top1 == labels).mean()))
    error = float(np.abs(logits - fp32).mean())
    return Answers(top1, int((top1 != fp32_top1).sum()), drop, error)


def run_folder(
    folder: Path, methods: list[str], sizes: list[int], seed: int, nested: bool
) -> tuple[list[dict], dict]:
    """Every method x n on one export folder: its rows and a summary of the folder."""
    manifest = read_manifest(folder)
    spec = Preprocessing.from_dict(manifest.preprocessing)
    train = read_split(folder, "train", manifest.classes)
    val = read_split(folder, "val", manifest.classes)
    sizes = sorted({min(n, len(train)) for n in sizes})
    sets = draws(train, sizes, seed, nested)
    src = folder / MODEL_ONNX
    x_val = load_batch([sm.path for sm in val], spec)
    labels = np.array([sm.label for sm in val])
    fp32 = open_onnx(src).logits_in_batches(x_val, BATCH)
    if nested:
        everything = load_batch([sm.path for sm in sets[sizes[-1]]], spec)
        images = {n: everything[:n] for n in sizes}
    else:
        images = {n: load_batch([sm.path for sm in sets[n]], spec) for n in sizes}
    q = QuantizeConfig()
    rows = []
    with tempfile.TemporaryDirectory(prefix="calibration-images-") as tmp:
        for method in methods:
            settings = Int8Settings(method, tuple(q.keep_float), True, q.percentile, q.trt_float)
            done: dict[int, tuple[dict[str, float], float, dict[str, Answers]]] = {}
            for n in reversed(sizes):  # the largest first: the others are compared with it
                work = Path(tmp) / f"{method}-{n}"
                work.mkdir()
                cal = Calibration(src, images[n], work)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # the calibrators' chatter
                    cache = cal.ranges(method, q.percentile)
                seconds = time.perf_counter() - t0
                got = {}
                for v in INT8:
                    dst = work / VARIANTS[v].file
                    make_int8(Int8Job(src, dst, cal, VARIANTS[v], settings))
                    got[v] = answers(dst, v, x_val, labels, fp32)
                done[n] = (widths(cache), seconds, got)
                print(f"  [{folder.name}] {method} n={n}: {seconds:.1f}s", flush=True)
            ref_w, _, ref_answers = done[sizes[-1]]
            for n in sizes:
                w, seconds, got = done[n]
                median, p95, tensors = width_moves(w, ref_w)
                row = {"method": method, "n": n, "median": median, "p95": p95}
                row |= {"tensors": tensors, "seconds": seconds}
                for v in INT8:
                    a = got[v]
                    row[v] = {
                        "changed": a.changed,
                        "drop": a.drop,
                        "vs_largest": int((a.top1 != ref_answers[v].top1).sum()),
                        "logit_error": a.logit_error,
                    }
                rows.append(row)
    summary = {
        "train": len(train),
        "val": len(val),
        "fp32": float((fp32.argmax(1) == labels).mean()),
        "draw": "nested prefixes of one seeded draw" if nested else "independent draws",
    }
    return rows, summary


def print_table(folder: Path, rows: list[dict], summary: dict) -> None:
    """One markdown table for one folder."""
    val = summary["val"]
    print()
    print(
        f"### {folder} — {summary['train']} training images, {val} validation, FP32 "
        f"{summary['fp32']:.1%}; {summary['draw']}"
    )
    print()
    print(
        "| method | n | width move median | width move p95 | calib s | "
        "int8_cpu changed vs FP32 | int8_cpu drop | int8_cpu ≠ largest n | int8_cpu logit err | "
        "int8_trt changed vs FP32 | int8_trt drop | int8_trt ≠ largest n | int8_trt logit err |"
    )
    print("|---|---:|---:|---:|---:" + "|---:" * 8 + "|")
    for r in rows:
        cells = [
            r["method"],
            str(r["n"]),
            f"{r['median']:.2%}",
            f"{r['p95']:.2%}",
            f"{r['seconds']:.1f}",
        ]
        for v in INT8:
            a = r[v]
            cells += [
                f"{a['changed']} ({a['changed'] / val:.1%})",
                f"{a['drop']:+.2f}",
                str(a["vs_largest"]),
                f"{a['logit_error']:.3f}",
            ]
        print("| " + " | ".join(cells) + " |")
    print(f"(range widths compared over {rows[0]['tensors']} tensors)")


def suite_export(name: str, work: Path, data_root: Path) -> Path:
    """The suite's set `name`, trained and exported with tlbuild's defaults (seed 0), as
    benchmarks/int8_accuracy.py trains it; reused when already exported under `work`."""
    import datasets
    from rich.console import Console

    from tlbuild.recipe import load_recipe
    from tlbuild.runner import call_stage

    out = work / name
    if (out / MODEL_ONNX).is_file() and (out / "splits.json").is_file():
        return out
    data = datasets.build(name, data_root)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.toml"
    path.write_text(datasets.default_recipe(name, data, work, SUITE_SIZES[name]))
    recipe = load_recipe(path)
    console = Console(quiet=True)
    t0 = time.perf_counter()
    call_stage("train", recipe, console)
    call_stage("export", recipe, console)
    print(f"  [{name}] trained and exported in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*", type=Path, help="export folders (exports/defects)")
    ap.add_argument("--suite", nargs="*", default=[], choices=list(SUITE_SIZES))
    ap.add_argument("--methods", nargs="+", default=["percentile"], choices=METHODS)
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--seed", type=int, default=QuantizeConfig().seed)
    ap.add_argument(
        "--independent",
        action="store_true",
        help="draw each n on its own with calibration_samples (default: nested prefixes)",
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "calib-suite")
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = ap.parse_args()
    folders = list(args.folders) or ([] if args.suite else [REPO / "exports" / "defects"])
    folders += [suite_export(name, args.work, args.data_root) for name in args.suite]
    for folder in folders:
        rows, summary = run_folder(
            folder, args.methods, args.sizes, args.seed, not args.independent
        )
        print_table(folder, rows, summary)


if __name__ == "__main__":
    main()
