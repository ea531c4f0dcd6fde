"""`tlbuild classify` on one machine: the local engine, Ray with a private local cluster, and Ray
against an already running head, on the same files.

For each, in this one run: rows per second, CPU seconds and peak resident memory of every process
the run used (the command's process tree; with a running head, also the head's processes, so
Ray's own daemons are counted either way), read from /proc every 0.2 s. Then the arithmetic for
10M images on N nodes from these figures.

    python benchmarks/classify_ray.py --model exports/defects --images 10000

Needs `pip install 'tlbuild[ray]'` and Linux (/proc). Memory is the sum of RSS, so pages shared
between processes (Ray's object store, shared libraries) count once per process: an upper bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from classify_throughput import make_images  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RAY_DAEMONS = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard", "log_monitor")


def _procs() -> dict[int, tuple[int, float, int, str]]:
    """pid -> (parent pid, CPU seconds, RSS bytes, command line) for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, utime, stime, rss = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[21])
        out[int(name)] = (ppid, (utime + stime) / TICK, rss * PAGE, stat[: stat.rindex(")")] + cmd)
    return out


def _tree(procs: dict[int, tuple[int, float, int, str]], root: int, daemons: bool) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in procs and pid not in found:
            found.add(pid)
            stack += children.get(pid, [])
    if daemons:  # a running head's processes are not the command's children
        found |= {p for p, v in procs.items() if any(d in v[3] for d in RAY_DAEMONS)}
    return found


def measure(cmd: list[str], daemons: bool) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS GiB) of a command and the processes it used."""
    before = _procs()
    base_cpu = {p: v[1] for p, v in before.items()}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu: dict[int, float] = {}
    peak = 0
    while proc.poll() is None:
        procs = _procs()
        tree = _tree(procs, proc.pid, daemons)
        for pid in tree:
            # Time a pre-existing daemon spent before this run started is not this run's.
            cpu[pid] = procs[pid][1] - base_cpu.get(pid, 0.0)
        peak = max(peak, sum(procs[p][2] for p in tree))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, sum(cpu.values()), peak / 2**30


def make_tree(root: Path, n: int, distinct: int = 500) -> Path:
    """n camera-sized JPEG paths under root/files (hard links to `distinct` rendered frames)."""
    files = root / "files"
    if len(list(files.glob("*.jpg"))) == n:
        return files
    src = make_images(root / "src", distinct)
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    for i in range(n):
        os.link(src[i % distinct], files / f"f{i:06d}.jpg")
    return files


def _fake_rows(n: int, start: int) -> dict[str, list]:
    """n result rows shaped like real ones (paths, top-3 labels, varied scores, no errors)."""
    labels = ["crack", "ok", "scratch", "spot"]
    rng = np.random.default_rng(start)
    p = rng.dirichlet([0.3] * 4, n)
    return {
        "path": [
            f"s3://bucket/line-7/2026-11-23/cam-{i % 8}/f{start + i:09d}.jpg" for i in range(n)
        ],
        "label": [labels[i % 4] for i in range(n)],
        "score": [float(r.max()) for r in p],
        "topk_labels": [labels[:3]] * n,
        "topk_scores": [[round(float(v), 6) for v in sorted(r, reverse=True)[:3]] for r in p],
        "ok_score": [float(r[1]) for r in p],
        "defective": [bool(r.argmax() != 1) for r in p],
        "decided_by": ["argmax"] * n,
        "width": [640] * n,
        "height": [480] * n,
        "file_size": [int(v) for v in rng.integers(30_000, 90_000, n)],
        "error": [None] * n,
        "model_sha256": ["0" * 64] * n,
        "artifact": ["model.int8.cpu.onnx"] * n,
        "precision": ["int8"] * n,
        "classified_at": [1_795_000_000_000_000 + (start + i) * 3000 for i in range(n)],
    }


def writer_rates(work: Path, n: int = 300_000, batch: int = 1024) -> dict[str, float]:
    """Rows/s the driver writes: one file (each commit copies the file) and a folder of parts;
    plus the bytes a row takes and the copy rate, to extrapolate the single file's cost."""
    from tlbuild.classify.dataset_out import ResultsDataset
    from tlbuild.classify.results import ResultsFile

    identity = {"model_sha256": "0" * 64, "artifact": "model.int8.cpu.onnx"}
    rates = {}
    for name, make in (
        ("file", lambda p: ResultsFile(p / "r.parquet", identity, overwrite=True)),
        ("folder", lambda p: ResultsDataset(f"{p}/ds/", identity, overwrite=True)),
    ):
        target = work / f"writer-{name}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        writer = make(target)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            writer.add(_fake_rows(min(batch, n - i), i))
        writer.close()
        rates[name] = n / (time.perf_counter() - t0)
    size = (work / "writer-file" / "r.parquet").stat().st_size
    rates["bytes/row"] = size / n
    t0 = time.perf_counter()
    shutil.copyfile(work / "writer-file" / "r.parquet", work / "writer-file" / "copy")
    rates["copy bytes/s"] = size / max(time.perf_counter() - t0, 1e-6)
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("exports/defects"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlbuild-ray-bench")
    args = ap.parse_args()
    files = make_tree(args.work, args.images)
    tlbuild = [sys.executable, "-m", "tlbuild", "classify", str(files), "--model", str(args.model)]
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        sys.exit("Ray is not installed: pip install 'tlbuild[ray]'")

    def out(name: str) -> list[str]:
        target = args.work / f"{name}.parquet"
        target.unlink(missing_ok=True)
        return ["--out", str(target)]

    results = {}
    results["local engine"] = measure([*tlbuild, *out("local")], daemons=False)
    results["ray, local cluster"] = measure(
        [*tlbuild, *out("ray_local"), "--engine", "ray", "--ray-address", "local"], daemons=False
    )
    subprocess.run([ray, "start", "--head", "--include-dashboard=false"], check=True,
                   capture_output=True)  # fmt: skip
    try:
        results["ray, running head"] = measure(
            [*tlbuild, *out("ray_head"), "--engine", "ray", "--ray-address", "auto"], daemons=True
        )
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)
    rows = {}
    for name, (wall, cpu, peak) in results.items():
        rows[name] = {
            "rows/s": args.images / wall,
            "wall s": wall,
            "CPU s": cpu,
            "CPU s per 1k rows": cpu / args.images * 1000,
            "peak RSS GiB": peak,
        }
    table = pd.DataFrame(rows).T
    print(f"{args.images:,} files, {os.cpu_count()} cores, model {args.model}")
    print(table.to_string(float_format=lambda v: f"{v:,.2f}"))
    local = rows["local engine"]["rows/s"]
    for name in ("ray, local cluster", "ray, running head"):
        print(f"{name}: {rows[name]['rows/s'] / local:.2f}x the local engine's rate")
    # The 10M arithmetic: CPU seconds per row is what a node of C cores divides.
    per_row = rows["ray, running head"]["CPU s per 1k rows"] / 1000
    cores = os.cpu_count() or 1
    node_rate = cores / per_row
    print(
        f"\n10M images: at {per_row * 1000:.1f} CPU s per 1k rows, a {cores}-core node classifies "
        f"~{node_rate:,.0f} rows/s; a 32-core node ~{32 / per_row:,.0f} rows/s (assuming the "
        "per-core rate holds: one actor per core, decode and inference both CPU-bound)."
    )
    for n in (1, 4, 16, 64):
        rate = n * 32 / per_row
        print(f"  {n:>3} x 32-core nodes: {rate:>10,.0f} rows/s -> {10e6 / rate / 3600:6.2f} h")
    w = writer_rates(args.work)
    print(
        f"\nDriver writes (measured on 300k rows): one file {w['file']:,.0f} rows/s, a folder of "
        f"parts {w['folder']:,.0f} rows/s; {w['bytes/row']:.0f} bytes a row, copies at "
        f"{w['copy bytes/s'] / 2**20:,.0f} MiB/s."
    )
    # One file: every commit of 65,536 rows copies the whole file, so its rate falls with size.
    group = 65_536
    for rows_in_file in (1e6, 10e6):
        copy_s = rows_in_file * w["bytes/row"] / w["copy bytes/s"]
        rate = group / (group / w["file"] + copy_s)
        print(
            f"  one file at {rows_in_file / 1e6:.0f}M rows: ~{rate:,.0f} rows/s "
            f"(copy {copy_s:.1f} s a commit)"
        )
    print(
        "  Use a folder --out once the cluster's rate nears the single file's rate at the size "
        "it will reach, and always for object storage."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
