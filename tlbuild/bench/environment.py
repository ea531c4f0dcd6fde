"""The machine a benchmark ran on: CPU, cores, memory, GPU and driver, library versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tlbuild.manifest import library_versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> tuple[list[str], str | None]:
    try:
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch on a device: ask the CUDA runtime through cuda-python
        from tlbuild.runtime.tensorrt import cuda_device_count, gpu_identity

        try:
            names = [gpu_identity()[0]] if cuda_device_count() else []
        except Exception:
            names = []
    driver = None
    if names and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    return names, driver


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask, which containers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment() -> dict[str, Any]:
    """A JSON-able description of this machine and its libraries."""
    import onnxruntime as ort

    gpus, driver = _gpus()
    return {
        "cpu": _cpu_model(),
        "cores": cpu_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus,
        "gpu_driver": driver,
        # Built in, not necessarily usable: onnxruntime-gpu lists CUDA and TensorRT on any
        # machine (bench.json adds those that start, which takes opening them).
        "onnxruntime_providers": ort.get_available_providers(),
        "versions": library_versions(),
    }


def machine_key(env: dict[str, Any]) -> dict[str, Any]:
    """The parts of `environment()` that change benchmark numbers (for incremental builds)."""
    return {k: env[k] for k in ("cpu", "cores", "gpus", "gpu_driver", "versions")}
