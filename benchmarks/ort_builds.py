"""ONNX Runtime's CPU build against its GPU build on a machine's CPU: what each costs to install
and how fast each runs an exported model on the CPU provider.

    python benchmarks/ort_builds.py exports/defects/model.onnx

For each build (the CPU build at the GPU build's version unless --latest-cpu): a fresh virtual
environment with numpy, then `pip install --no-deps` of the build alone, timed (from the
configured index or its cache); the wheel's size and the installed folder's size. Then
model.onnx on the CPU provider at batch 1 and 32 in each environment, the two alternated round
by round so that machine noise hits both alike; images/s and GPU-build / CPU-build ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILDS = ("onnxruntime", "onnxruntime-gpu")

# Run inside each environment: images/s of the model on the CPU provider, one line of JSON.
CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, batch, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
shape = [batch] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
for _ in range(3):
    s.run(None, {i.name: x})
t = time.perf_counter()
for _ in range(iters):
    s.run(None, {i.name: x})
print(json.dumps({"ips": batch * iters / (time.perf_counter() - t), "version": ort.__version__}))
"""


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def install(build: str, root: Path, version: str | None = None) -> dict[str, object]:
    """A venv with numpy and `build` (at `version`): install seconds, wheel and installed MB,
    its python."""
    env = root / build
    spec = f"{build}=={version}" if version else build
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    pip = [str(py), "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "numpy", "flatbuffers", "packaging", "protobuf"], check=True)
    wheels = root / f"{build}-wheel"
    subprocess.run([*pip, "download", "--no-deps", "-d", str(wheels), spec], check=True)
    wheel = next(wheels.glob("*.whl"))
    t = time.perf_counter()
    subprocess.run([*pip, "install", "--no-deps", spec], check=True)
    seconds = time.perf_counter() - t
    site = next(env.glob("lib/python*/site-packages"))
    return {
        "python": py,
        "install_s": round(seconds, 1),
        "wheel_mb": round(wheel.stat().st_size / 1e6, 1),
        "installed_mb": round(_size_mb(site / "onnxruntime"), 1),
    }


def throughput(py: Path, model: Path, batch: int, iters: int) -> tuple[float, str]:
    done = subprocess.run(
        [str(py), "-c", CHILD, str(model), str(batch), str(iters)],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return row["ips"], row["version"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="an exported model.onnx")
    ap.add_argument("--rounds", type=int, default=5, help="alternations per batch size")
    ap.add_argument(
        "--latest-cpu", action="store_true", help="the newest CPU build, not the same version"
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tlbuild-ort-builds-"))
    try:
        # The CPU build at the GPU build's version (PyPI's GPU build often lags a release), so
        # that the ratio compares builds, not releases; --latest-cpu compares what pip picks.
        gpu = install("onnxruntime-gpu", root)
        pinned = (
            None if args.latest_cpu else throughput(Path(str(gpu["python"])), args.model, 1, 5)[1]
        )
        envs = {"onnxruntime": install("onnxruntime", root, pinned), "onnxruntime-gpu": gpu}
        print("| build | version | wheel MB | installed MB | install s (--no-deps) |")
        print("|---|---|---|---|---|")
        versions = {}
        for b, e in envs.items():
            versions[b] = throughput(Path(str(e["python"])), args.model, 1, 5)[1]
            print(
                f"| {b} | {versions[b]} | {e['wheel_mb']} | {e['installed_mb']} "
                f"| {e['install_s']} |"
            )
        print()
        print("| batch | onnxruntime img/s | onnxruntime-gpu img/s (CPU provider) | ratio |")
        print("|---|---|---|---|")
        for batch, iters in ((1, 200), (32, 10)):
            got: dict[str, list[float]] = {b: [] for b in BUILDS}
            for _ in range(args.rounds):
                for b in BUILDS:
                    got[b].append(
                        throughput(Path(str(envs[b]["python"])), args.model, batch, iters)[0]
                    )
            cpu, gpu = (statistics.median(got[b]) for b in BUILDS)
            print(f"| {batch} | {cpu:.1f} | {gpu:.1f} | {gpu / cpu:.3f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
