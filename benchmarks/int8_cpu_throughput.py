"""INT8 (CPU flavour) vs FP32 throughput with ONNX Runtime on this machine, batch 32.

    python benchmarks/int8_cpu_throughput.py exports/defects

Runs both models on the same real validation batch, alternating them round by round so that
machine noise hits both alike, and prints images/s for each, their ratio (target >= 1.3) and
the accuracy drop the gate measured (target <= 1 point).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.data.splits_file import read_split
from tlbuild.manifest import read_manifest
from tlbuild.runtime.sessions import ort_session


def rates(
    out: Path, batch: int = 32, rounds: int = 15, int8: str = "model.int8.cpu.onnx"
) -> dict[str, float]:
    """images/s of model.onnx and model.int8.cpu.onnx on one real validation batch, the two
    alternated round by round so machine noise hits both alike."""
    manifest = read_manifest(out)
    paths = [s.path for s in read_split(out, "val", manifest.classes)]
    spec = Preprocessing.from_dict(manifest.preprocessing)
    x = load_batch((paths * (batch // len(paths) + 1))[:batch], spec)
    models = {"fp32": out / "model.onnx", "int8_cpu": out / int8}  # a rejected one too
    sessions = {k: ort_session(p) for k, p in models.items()}
    name = sessions["fp32"].get_inputs()[0].name
    for s in sessions.values():  # warm-up
        for _ in range(2):
            s.run(None, {name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {name: x})
            times[k].append(time.perf_counter() - t0)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def main(export_dir: str, batch: int = 32, rounds: int = 15) -> None:
    out = Path(export_dir)
    rate = rates(out, batch, rounds)
    for k, r in rate.items():
        print(f"{k:>9}: {r:7.1f} img/s at batch {batch} (median of {rounds} rounds)")
    print(f"int8_cpu / fp32 throughput: {rate['int8_cpu'] / rate['fp32']:.2f}x (target >= 1.5x)")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    v = manifest["variants"]["int8_cpu"]
    print(
        f"int8_cpu accuracy {v['accuracy']:.2%} vs fp32 {v['fp32_accuracy']:.2%}: "
        f"drop {v['drop_points']:.2f} points (target <= 1.0)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "exports/defects")
