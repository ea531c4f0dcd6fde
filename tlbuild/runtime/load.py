"""Open an export folder, or one artifact of it, as a Predictor checked against its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import UsageError
from tlbuild.fileio import sha256_file
from tlbuild.runtime.backends import OnnxPredictor, TensorRTPredictor, TorchPredictor
from tlbuild.runtime.base import Predictor

# Preference for CPU inference: INT8 for x86 first (1.5x FP32 here), then FP32.
CPU_ORDER = ("model.int8.cpu.onnx", "model.onnx")
PRECISION = {
    "model.onnx": "fp32",
    "model.fp16.onnx": "fp16",
    "model.int8.trt.onnx": "int8",
    "model.int8.cpu.onnx": "int8",
    "model.pt": "fp32",
}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest.json, or a UsageError saying what the folder lacks."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{folder} has no manifest.json; is it a tlbuild export folder?")
    return json.loads(path.read_text(encoding="utf-8"))


def verify_artifact(folder: Path, name: str, manifest: dict[str, Any]) -> None:
    """Refuse an artifact whose sha256 differs from the manifest (a corrupt or swapped copy)."""
    entry = manifest.get("artifacts", {}).get(name)
    if entry is None:
        raise UsageError(f"{name} is not listed in {folder / 'manifest.json'}")
    if sha256_file(folder / name) != entry["sha256"]:
        raise UsageError(f"{folder / name} does not match the sha256 in its manifest; re-copy it")


def accepted(manifest: dict[str, Any], name: str) -> bool:
    """Whether the build's gates accepted this artifact (a variant or a TensorRT engine)."""
    for v in manifest.get("variants", {}).values():
        if v["file"] == name:
            return v["status"] == "accepted"
    for e in (manifest.get("engines") or {}).get("engines", {}).values():
        if e.get("path") == name:
            return e.get("status") == "accepted"
    return name in ("model.onnx", "model.pt")


def _auto_candidates(
    folder: Path, manifest: dict[str, Any], artifact: str | None
) -> list[tuple[str, str]]:
    """(artifact, provider) pairs, fastest first for this machine: TensorRT engines, then CUDA,
    then the CPU. Each is tried in turn, so an engine built for another GPU, or a CUDA provider
    whose libraries are missing, falls through to the next with its reason kept."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if artifact is not None:
        if artifact.endswith(".engine"):
            return [(artifact, "tensorrt")]
        return ([(artifact, "cuda")] if cuda else []) + [(artifact, "cpu")]
    found: list[tuple[str, str]] = []
    engines = (manifest.get("engines") or {}).get("engines", {})
    for variant in ("int8_trt", "fp16", "fp32"):
        e = engines.get(variant) or {}
        if e.get("status") == "accepted" and e.get("path"):
            found.append((e["path"], "tensorrt"))
    if cuda:
        found += [("model.fp16.onnx", "cuda"), ("model.onnx", "cuda")]
    found += [(n, "cpu") for n in CPU_ORDER]
    return [(n, p) for n, p in found if (folder / n).is_file() and accepted(manifest, n)]


def load_predictor(
    path: Path | str,
    artifact: str | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
) -> Predictor:
    """Open `path`: an export folder (its best artifact for `provider`, or `artifact`) or a file.

    `provider` is cpu, cuda, tensorrt, or auto (the fastest artifact and provider that start on
    this machine). `threads` and `spinning` tune ONNX Runtime's CPU thread pool.
    """
    path = Path(path)
    if path.is_file():
        folder, artifact = path.parent, path.name
    elif path.is_dir():
        folder = path
    else:
        raise UsageError(f"model not found: {path}")
    manifest = read_manifest(folder)
    if provider == "auto":
        tried: list[str] = []
        for name, prov in _auto_candidates(folder, manifest, artifact):
            verify_artifact(folder, name, manifest)  # a corrupt copy is an error, not a fallback
            try:
                predictor = _open(folder, manifest, name, prov, threads, spinning)
            except Exception as e:  # the next candidate may well work
                tried.append(f"{name} on {prov}: {e}")
                continue
            predictor.passed_over = tried
            return predictor
        raise UsageError(
            f"no artifact in {folder} runs here"
            + (": " + "; ".join(tried) if tried else "; run `tlbuild run` first")
        )
    if artifact is None:
        order = CPU_ORDER if provider == "cpu" else ("model.onnx",)
        artifact = next((n for n in order if (folder / n).is_file() and accepted(manifest, n)), "")
        if not artifact:
            raise UsageError(f"no usable artifact in {folder}; run `tlbuild run` first")
    return _open(folder, manifest, artifact, provider, threads, spinning)


def _open(
    folder: Path,
    manifest: dict[str, Any],
    name: str,
    provider: str,
    threads: int | None,
    spinning: bool,
) -> Predictor:
    if not (folder / name).is_file():
        raise UsageError(f"no {name} in {folder}")
    verify_artifact(folder, name, manifest)
    if not accepted(manifest, name):
        raise UsageError(f"{name} was rejected by the accuracy gate; see manifest.json variants")
    classes = list(manifest["classes"])
    spec = Preprocessing.from_dict(manifest["preprocessing"])
    if name.endswith(".pt"):
        return TorchPredictor(folder / name, device="cuda" if provider == "cuda" else "cpu")
    if name.endswith(".engine"):
        return TensorRTPredictor(folder / name, classes, spec, name.split(".")[1])
    if name.endswith(".onnx"):
        precision = PRECISION.get(name, "fp32")
        return OnnxPredictor(folder / name, classes, spec, precision, provider, threads, spinning)
    raise UsageError(f"{name}: not a model artifact (.onnx, .engine or .pt)")
