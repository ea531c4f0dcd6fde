"""Peak memory of `tlbuild classify` must not grow with the number of images.

Classifies 10,000 and then 100,000 small JPEGs (hard links to a few hundred distinct files, spread
over folders of 1,000) in a child process each, samples its resident memory while it runs and
reads its peak (ru_maxrss) when it ends. Prints both runs and the ratio of the peaks.

    python benchmarks/classify_memory.py --model exports/defects
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from tlbuild.data.synth import CLASSES, _render


def make_tree(root: Path, n: int, distinct: int = 256) -> Path:
    """n JPEG paths under root/dNNN/ (1,000 per folder): hard links to `distinct` small files."""
    src = root / "src"
    if not src.exists():
        src.mkdir(parents=True)
        for i in range(distinct):
            Image.fromarray(_render(2, i % len(CLASSES), i, 96)).save(src / f"{i}.jpg", quality=90)
    tree = root / f"n{n}"
    if not tree.exists():
        tmp = root / f".n{n}.tmp"
        for i in range(n):
            d = tmp / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                d.mkdir(parents=True)
            os.link(src / f"{i % distinct}.jpg", d / f"img_{i:06d}.jpg")
        tmp.rename(tree)
    return tree


def run(tree: Path, model: Path, out: Path) -> tuple[float, int, list[int]]:
    """Seconds, peak RSS (bytes) and RSS samples (bytes) of one classify run."""
    cmd = [
        sys.executable,
        "-m",
        "tlbuild",
        "classify",
        str(tree),
        "--model",
        str(model),
        "--out",
        str(out),
        "--overwrite",
    ]
    t = time.perf_counter()
    err = out.with_suffix(".stderr")
    with open(err, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
        samples = []
        while True:
            # wait4 reaps the child and gives its own rusage: ru_maxrss is its peak RSS.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        samples.append(int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.5)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"classify failed ({proc.returncode}): {err.read_text()[-2000:]}")
    peak = usage.ru_maxrss * 1024
    return seconds, peak, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("exports/defects"))
    ap.add_argument("--folder", type=Path, default=Path("data/bench-many"))
    ap.add_argument("--sizes", default="10000,100000")
    args = ap.parse_args()
    if not (args.model / "manifest.json").is_file():
        print(f"{args.model} is not an export folder; run the demo build first (README)")
        return 2
    mib = 1 << 20
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"preparing {n:,} files ...", flush=True)
            tree = make_tree(args.folder, n)
            out = Path(tmp) / f"r{n}.parquet"
            seconds, peak, samples = run(tree, args.model, out)
            q = (
                [samples[int(len(samples) * f)] // mib for f in (0.25, 0.5, 0.75)]
                if samples
                else []
            )
            peaks.append(peak)
            print(
                f"{n:>8,} images  {seconds:6.1f}s  {n / seconds:6.0f} img/s  peak RSS "
                f"{peak / mib:6.0f} MiB  RSS at 25/50/75% of the run: {q} MiB  "
                f"results {out.stat().st_size / mib:.1f} MiB"
            )
    if len(peaks) > 1:
        print(
            f"peak RSS ratio, largest / smallest run: {peaks[-1] / peaks[0]:.2f} "
            "(flat memory: close to 1)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
