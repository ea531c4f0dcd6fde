"""INT8 that keeps its accuracy: every calibration method, with and without the search, on the
accuracy suite's real image sets (and the demo).

    python benchmarks/int8_accuracy.py                       # every set, every method
    python benchmarks/int8_accuracy.py scenes --methods entropy

Per set, one model is trained (tlbuild defaults, seed 0) and exported; then for each
calibration method `tlbuild quantize` runs twice on that same model: with the search off
(`search_budget = 0`, what tlbuild shipped before) and with the default budget. Prints, per run,
the INT8 CPU variant's validation drop against FP32, whether the gate accepted it, the layers the
search kept in float, its trials and seconds, and INT8/FP32 throughput at batch 32 on this
machine (the two alternated round by round). Targets: drop <= 1 point, throughput >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "accuracy"))

import datasets  # noqa: E402
from int8_cpu_throughput import rates  # noqa: E402
from rich.console import Console  # noqa: E402

from tlbuild.recipe import QuantizeConfig, load_recipe  # noqa: E402
from tlbuild.runner import call_stage  # noqa: E402

SIZES = {"textures": 128, "scenes": 128, "faces": 128, "demo": 160}
DATA_ROOT = Path(__file__).resolve().parents[1] / "data" / "bench-accuracy"
METHODS = ("minmax", "entropy", "percentile")


def _quantize(recipe, console: Console, method: str, budget: int) -> dict:  # noqa: ANN001
    q = QuantizeConfig(
        variants=("int8_trt", "int8_cpu"),
        calibration_method=method,
        search_budget=budget,
        on_fail="reject",
    )
    t0 = time.perf_counter()
    variants = call_stage("quantize", recipe.model_copy(update={"quantize": q}), console)
    seconds = time.perf_counter() - t0
    row = {"method": method, "budget": budget, "seconds": round(seconds, 1)}
    for name, v in variants.items():
        s = v.search or {}
        row[name] = {
            "drop": v.drop_points,
            "status": v.status,
            "extra_float": len(s.get("extra_float", [])),
            "trials": len(s.get("trials", [])),
            "search_s": s.get("seconds", 0.0),
            "search_drop": s.get("drop_points"),
        }
    r = rates(recipe.out_dir, int8=variants["int8_cpu"].file)
    row["int8_cpu"]["speedup"] = round(r["int8_cpu"] / r["fp32"], 2)
    return row


def run_set(name: str, methods: list[str], work: Path) -> list[dict]:
    """Train and export once, then quantize per method, without and with the search."""
    data = datasets.build(name, DATA_ROOT)
    text = datasets.default_recipe(name, data, work, SIZES[name])
    path = work / f"{name}.toml"
    path.write_text(text)
    recipe = load_recipe(path)
    console = Console(quiet=True)
    trained = call_stage("train", recipe, console)
    call_stage("export", recipe, console)
    fp32 = trained.metrics["val"]["accuracy"]
    rows = []
    for method in methods:
        for budget in (0, QuantizeConfig().search_budget):
            row = {"set": name, "fp32": fp32, **_quantize(recipe, console, method, budget)}
            c = row["int8_cpu"]
            print(
                f"  [{name}] {method:<10} search {'on ' if budget else 'off'}: int8_cpu drop "
                f"{c['drop']:+.2f} ({c['status']}), {c['extra_float']} layer(s) kept in float, "
                f"{c['trials']} trial(s), search {c['search_s']:.0f}s, speed {c['speedup']:.2f}x; "
                f"int8_trt drop {row['int8_trt']['drop']:+.2f} ({row['int8_trt']['status']})",
                flush=True,
            )
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="*", default=list(datasets.BUILDERS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows: list[dict] = []
    for name in args.sets:
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_set(name, args.methods, Path(tmp))
    print()
    print(
        "| set | FP32 | method | search | int8_cpu drop | gate | kept in float | trials | "
        "search s | int8_cpu speed | int8_trt drop |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, t = r["int8_cpu"], r["int8_trt"]
        print(
            f"| {r['set']} | {r['fp32']:.1%} | {r['method']} | {'on' if r['budget'] else 'off'} | "
            f"{c['drop']:+.2f} | {c['status']} | {c['extra_float']} | {c['trials']} | "
            f"{c['search_s']:.0f} | {c['speedup']:.2f}x | {t['drop']:+.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
