"""manifest.json: what was built, from what, how to feed it, and the hash of every artifact."""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

from tlbuild import __version__
from tlbuild.fileio import sha256_file, write_json


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the artifacts."""
    import numpy
    import onnx
    import onnxruntime
    import timm
    import torch

    return {
        "tlbuild": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "tensorrt": _tensorrt_version(),
    }


def _tensorrt_version() -> str:
    # Recorded either way: a device compares it with its own before reusing any engine.
    try:
        import tensorrt  # type: ignore[import-not-found]

        return str(tensorrt.__version__)
    except Exception:  # not installed, or its CUDA libraries are missing
        return "not installed"


def describe_artifacts(out_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named file that exists under out_dir."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        p = out_dir / name
        if p.is_file():
            out[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def update_manifest(out_dir: Path, manifest: dict[str, Any], extra: list[str]) -> Path:
    """Rewrite a read manifest with changed sections, re-hashing its artifacts plus `extra`."""
    generated = ("format", "created", "versions", "artifacts")
    body = {k: v for k, v in manifest.items() if k not in generated}
    return write_manifest(out_dir, body, list(manifest["artifacts"]) + extra)


def write_manifest(out_dir: Path, body: dict[str, Any], artifact_names: list[str]) -> Path:
    """Write manifest.json atomically with versions, time and artifact hashes added."""
    manifest = {
        "format": "tlbuild.manifest/1",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **body,
        "artifacts": describe_artifacts(out_dir, artifact_names),
    }
    path = out_dir / "manifest.json"
    write_json(path, manifest)
    return path
