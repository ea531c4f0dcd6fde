"""Accuracy suite: tlbuild's default recipe against a plain full fine-tune, on real images.

    python benchmarks/accuracy/run.py                 # every set, input 128 (demo: 160)
    python benchmarks/accuracy/run.py textures faces  # some sets
    python benchmarks/accuracy/run.py --int8          # also quantize and score INT8 variants

For each set (built offline into data/bench-accuracy/ on first use, see datasets.py) both are
trained in this process on this machine, one after the other: the baseline
(baseline.py, independent of tlbuild's training code, 6 epochs) and `tlbuild train` with a
recipe that names only the data folders and the input size. Prints one table: validation
accuracy and wall time of each, tlbuild's head-only accuracy, and the differences.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import baseline  # noqa: E402
import datasets  # noqa: E402
from rich.console import Console  # noqa: E402

from tlbuild.models.checkpoint import load_trained  # noqa: E402
from tlbuild.recipe import load_recipe  # noqa: E402
from tlbuild.runner import call_stage  # noqa: E402

SIZES = {"textures": 128, "scenes": 128, "faces": 128, "demo": 160}
DATA_ROOT = Path(__file__).resolve().parents[2] / "data" / "bench-accuracy"


def tlbuild_default(
    data: Path, size: int | str, work: Path, extra: str = "", int8: bool = False
) -> dict:
    """`tlbuild train` (and quantize with --int8) with a recipe naming only data and input size."""
    text = datasets.default_recipe(data.name, data, work, size) + f"{extra}\n"
    if int8:  # measure every INT8 variant, whether or not it passes the accuracy gate
        text += '\n[quantize]\nvariants = ["int8_trt", "int8_cpu"]\non_fail = "reject"\n'

    path = work / f"{data.name}.toml"
    path.write_text(text)
    recipe = load_recipe(path)
    console = Console(quiet=True)
    t0 = time.perf_counter()
    out = call_stage("train", recipe, console)
    seconds = time.perf_counter() - t0
    used = load_trained(recipe.out_dir / "model.pt").preprocessing.input_size
    row = {
        "input": used[0],
        "accuracy": out.metrics["val"]["accuracy"],
        "seconds": seconds,
        "epochs": len(out.result.history),
        "head_only": out.metrics.get("head_only", {}).get("accuracy"),
        "shipped": "linear probe" if out.result.best_epoch == -1 else "fine-tuned",
        "lr_found": [r["chosen"] for r in out.result.lr_find],
    }
    if int8:
        call_stage("export", recipe, console)
        variants = call_stage("quantize", recipe, console)
        row["int8"] = {k: (v.accuracy, v.status) for k, v in variants.items()}
    return row


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _acc(xs: list[float]) -> str:
    """Mean accuracy, and the range over seeds when there are several."""
    if len(xs) == 1:
        return f"{xs[0]:.1%}"
    return f"{_mean(xs):.1%} ({min(xs):.1%}-{max(xs):.1%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="*", default=list(datasets.BUILDERS))
    ap.add_argument("--int8", action="store_true", help="also quantize and score INT8 variants")
    ap.add_argument("--seeds", type=int, default=1, help="train each with seeds 0..N-1")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--size", help="tlbuild's input size instead of the set's (e.g. \"auto\" or 224)"
    )
    ap.add_argument("--extra", default="", help="recipe text appended (for experiments)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for name in args.sets:
        data = datasets.build(name, DATA_ROOT)
        size = SIZES[name]
        tl_size = size if args.size is None else args.size
        n_train = sum(1 for p in (data / "train").rglob("*") if p.is_file())
        n_val = sum(1 for p in (data / "val").rglob("*") if p.is_file())
        classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
        print(f"[{name}] {classes} classes, {n_train}/{n_val} images, input {size}", flush=True)
        bases, tls = [], []
        for seed in range(args.seeds):
            if not args.skip_baseline:
                b = baseline.plain_finetune(data, size, seed=seed)
                print(f"  seed {seed} baseline {b.accuracy:.1%} in {b.seconds:.0f}s", flush=True)
                bases.append(vars(b))
            extra = f"{args.extra}\n" if seed == 0 else f"[train]\nseed = {seed}\n{args.extra}\n"
            with tempfile.TemporaryDirectory() as tmp:
                tl = tlbuild_default(data, tl_size, Path(tmp), extra, args.int8 and seed == 0)
            print(
                f"  seed {seed} tlbuild  {tl['accuracy']:.1%} in {tl['seconds']:.0f}s", flush=True
            )
            tls.append(tl)
        rows.append(
            {
                "set": name,
                "classes": classes,
                "images": f"{n_train}/{n_val}",
                "input": tls[0]["input"],
                "baseline": bases,
                "tlbuild": tls,
            }
        )
    print()
    print(
        "| set | classes | train/val | input | plain fine-tune, 6 ep. | time | "
        "tlbuild default | time | head only | difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, t = r["baseline"], r["tlbuild"]
        t_acc = [x["accuracy"] for x in t]
        heads = [x["head_only"] for x in t if x["head_only"] is not None]
        ho = _acc(heads) if heads else "–"
        base_acc = _acc([x["accuracy"] for x in b]) if b else "–"
        base_s = f"{_mean([x['seconds'] for x in b]):.0f} s" if b else "–"
        diff = f"{(_mean(t_acc) - _mean([x['accuracy'] for x in b])) * 100:+.1f} pts" if b else "–"
        epochs = "/".join(sorted({str(x["epochs"]) for x in t}))
        line = (
            f"| {r['set']} | {r['classes']} | {r['images']} | {r['input']} | {base_acc} | "
            f"{base_s} | {_acc(t_acc)} ({epochs} ep.) | {_mean([x['seconds'] for x in t]):.0f} s "
            f"| {ho} | {diff} |"
        )
        print(line)
    if args.seeds > 1:
        print(f"\nMeans over seeds 0-{args.seeds - 1} (range in brackets); times are means.")
    if args.int8:
        print()
        for r in rows:
            t0 = r["tlbuild"][0]
            shown = ", ".join(
                f"{k} {acc:.1%} ({status})" for k, (acc, status) in t0["int8"].items()
            )
            print(f"{r['set']} (seed 0): FP32 {t0['accuracy']:.1%}; {shown}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
