"""Does the [decision] threshold chosen on validation meet its target on images it never saw?

    python benchmarks/decision_holdout.py                    # the demo set
    python benchmarks/decision_holdout.py demo faces textures --escape 0.005 0.02 0.05

For each set one build (`tlbuild run`, default training) with a validation split that chooses
the threshold and a test split held out from the choice; then, per target, only the decision
stage reruns (incremental build). Prints the chosen threshold, the escape and false-reject
rates on validation and on the held-out test split with their Wilson intervals, and whether
the held-out split meets the target.

Sets: `demo` is tlbuild's synthetic surface-defect data (data/demo, made with
`tlbuild data synth-defects data/demo --per-class 150`), split 60/20/20. The real-image sets of
the accuracy suite (benchmarks/accuracy/datasets.py, built offline into data/bench-accuracy/)
keep their training folder; their validation folder is split in two halves per class, one to
choose on and one held out. They have no defect class, so one class stands in for "ok"
(OK_CLASS below) and every other class is "defective".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tlbuild import runner
from tlbuild.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))

OK_CLASS = {"demo": "ok", "faces": "face", "textures": "brick", "scenes": "coffee"}
SIZES = {"demo": 160, "faces": 128, "textures": 128, "scenes": 128}
# Fast, CPU-only settings around the default training: one INT8 variant (the one classify
# uses on a CPU), a short benchmark, no heat maps.
REST = """
[quantize]
variants = ["int8_cpu"]
calibration_method = "minmax"
search_budget = 0
on_fail = "reject"
[build]
variants = []
[bench]
batch_sizes = [1]
min_iters = 5
min_seconds = 0.0
max_seconds = 0.5
timer_check = false
[explain]
max_images = 0
"""


def _halves(val: Path, work: Path) -> tuple[Path, Path]:
    """Alternate files of each class of `val` into two folders of symlinks."""
    a, b = work / "val_choose", work / "val_holdout"
    for cls in sorted(p for p in val.iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(p for p in cls.iterdir() if p.is_file())):
            dst = (a if i % 2 == 0 else b) / cls.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(f.resolve())
    return a, b


def _data_section(name: str, work: Path) -> str:
    if name == "demo":
        root = ROOT / "data" / "demo"
        if not root.is_dir():
            sys.exit("no data/demo: run `tlbuild data synth-defects data/demo --per-class 150`")
        return f'root = "{root}"\nsplit = {{ val = 0.2, test = 0.2, seed = 0 }}\n'
    import datasets  # the accuracy suite's offline builder

    data = datasets.build(name, ROOT / "data" / "bench-accuracy")
    choose, holdout = _halves(data / "val", work)
    return f'train = "{data / "train"}"\nval = "{choose}"\ntest = "{holdout}"\n'


def _decision(escape: float | None, fr: float | None) -> str:
    key, value = (
        ("max_escape_rate", escape) if escape is not None else ("max_false_reject_rate", fr)
    )
    return f"[decision]\n{key} = {value}\n"


def _stat(x: dict) -> str:
    return f"{x['count']}/{x['total']} ({x['rate']:.1%}, up to {x['wilson'][1]:.1%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="*", default=["demo"], choices=sorted(OK_CLASS))
    ap.add_argument("--escape", type=float, nargs="*", default=[0.005, 0.02, 0.05])
    ap.add_argument("--false-reject", type=float, nargs="*", default=[0.02, 0.05])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    targets = [(e, None) for e in args.escape] + [(None, f) for f in args.false_reject]
    rows = []
    for name in args.sets:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            head = (
                f'name = "{name}"\noutput_dir = "{work / "out"}"\n[data]\n'
                f'{_data_section(name, work)}ok_class = "{OK_CLASS[name]}"\n'
                f'[model]\npreprocess = {{ input_size = {SIZES[name]}, resize = "resize" }}\n'
                f"{REST}"
            )
            recipe_file = work / f"{name}.toml"
            for escape, fr in targets:
                recipe_file.write_text(head + _decision(escape, fr))
                recipe = load_recipe(recipe_file)
                t0 = time.perf_counter()
                runner.run(recipe, Console(quiet=True))
                d = json.loads((recipe.out_dir / "manifest.json").read_text())["decision"]
                int8 = d["artifacts"].get("model.int8.cpu.onnx")
                row = {
                    "set": name,
                    "target": d["target"],
                    "threshold": d["threshold"],
                    "rule": d["rule"],
                    "met_on_val": d["met"],
                    "val": d["val"],
                    "test": d["test"],
                    "int8_val": int8,
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                (key, limit), stat = next(iter(d["target"].items())), "escapes"
                if key == "max_false_reject_rate":
                    stat = "false_rejects"
                verdict = "meets" if d["test"]["met"] else "MISSES"
                print(
                    f"[{name}] {key} {limit:g}: {d['rule']} ({row['seconds']:.0f}s); "
                    f"held-out {stat.replace('_', ' ')} {_stat(d['test'][stat])} {verdict} "
                    f"the target",
                    flush=True,
                )
    print()
    print(
        "| set | target | threshold | val escapes | val false rejects | test escapes | "
        "test false rejects | test meets target | INT8 val escapes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        (key, limit) = next(iter(r["target"].items()))
        i8 = _stat(r["int8_val"]["escapes"]) if r["int8_val"] else "not shipped (quantize gate)"
        val_note = "" if r["met_on_val"] else " (not met on val)"
        print(
            f"| {r['set']} (ok = {OK_CLASS[r['set']]}) | {key} {limit:g} | "
            f"{r['rule']}{val_note} | {_stat(r['val']['escapes'])} | "
            f"{_stat(r['val']['false_rejects'])} | {_stat(r['test']['escapes'])} | "
            f"{_stat(r['test']['false_rejects'])} | {'yes' if r['test']['met'] else 'no'} | {i8} |"
        )
    print(
        "\nRates are count/total (rate, up to the 95% Wilson upper bound). The threshold is "
        "chosen on validation only; the test split never takes part."
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
