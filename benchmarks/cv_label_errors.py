"""Does `tlbuild cv` find planted label errors in real photographs?

Copies one set of the accuracy suite (train and val together, one folder per class), moves a
few images, seeded, into a wrong class folder, runs K-fold cross-validation with the default
recipe, and prints the spread across folds and where each planted image lands in the list of
likely label errors (rank 1 = most suspicious), with precision and recall in the top N.

    python benchmarks/cv_label_errors.py textures --plant 10 --folds 3
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent / "accuracy"))

import datasets  # noqa: E402

from tlbuild.cv.report import write_cv_outputs  # noqa: E402
from tlbuild.cv.run import run_cv  # noqa: E402
from tlbuild.recipe import load_recipe  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parents[1] / "data" / "bench-accuracy"


def plant(src: Path, dst: Path, n: int, seed: int) -> list[Path]:
    """Merge src/{train,val}/<class> into dst/<class> and move n images to another class."""
    for split in ("train", "val"):
        for folder in sorted((src / split).iterdir()):
            (dst / folder.name).mkdir(parents=True, exist_ok=True)
            for f in folder.iterdir():
                if f.name.startswith("."):
                    continue
                shutil.copy(f, dst / folder.name / f"{split}_{f.name}")
    rng = random.Random(seed)
    classes = sorted(p.name for p in dst.iterdir())
    planted = []
    for i in range(n):
        given = classes[i % len(classes)]
        wrong = rng.choice([c for c in classes if c != given])
        f = rng.choice(sorted((dst / given).iterdir()))
        moved = dst / wrong / f"planted_{i}_{given}_{f.name}"
        shutil.move(f, moved)
        planted.append(moved)
    return planted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", default="textures")
    ap.add_argument("--plant", type=int, default=10)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    source = datasets.build(args.set, DATA_ROOT)
    work = Path(tempfile.mkdtemp(prefix="tlbuild-cv-"))
    planted = plant(source, work / "data", args.plant, args.seed)
    recipe_path = work / "cv.toml"
    recipe_path.write_text(
        f'name = "cv"\noutput_dir = "{work / "out"}"\n[data]\nroot = "{work / "data"}"\n'
        f'[model]\npreprocess = {{ input_size = {args.size}, resize = "resize" }}\n'
    )
    result = run_cv(load_recipe(recipe_path), args.folds, Console(quiet=True))
    write_cv_outputs(result)
    ranks = {p: None for p in planted}
    for rank, i in enumerate(result.issues, start=1):
        path = result.samples[i].path
        if path in ranks:
            ranks[path] = rank
    s = result.summary
    print(f"{args.set}: {len(result.samples)} images, {args.folds} folds, {args.plant} planted")
    for key in ("accuracy", "macro_f1"):
        print(f"  {key}: {s[key]['mean']:.1%} +- {s[key]['std']:.1%}")
    print(f"  flagged: {len(result.issues)} images")
    print("  planted ranks: " + ", ".join(str(r) if r else "-" for r in ranks.values()))
    n = args.plant
    top = sum(1 for r in ranks.values() if r is not None and r <= n)
    found = sum(1 for r in ranks.values() if r is not None)
    print(f"  in the top {n}: {top}/{n}; flagged at all: {found}/{n}")
    print(f"  report: {result.out / 'cv_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
