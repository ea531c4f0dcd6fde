"""Open an export folder, or one artifact of it, as a Predictor checked against its manifest."""

from __future__ import annotations

from pathlib import Path

from tlbuild.artifacts import (
    CPU_ORDER,
    MODEL_ONNX,
    ONNX_ARTIFACTS,
    is_image_model,
    precision_of,
)
from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import UsageError
from tlbuild.manifest import Manifest, read_manifest
from tlbuild.runtime.backends import ImageOnnxPredictor, OnnxPredictor, TensorRTPredictor
from tlbuild.runtime.base import Predictor
from tlbuild.runtime.providers import provider_problem
from tlbuild.runtime.sessions import OrtOptions, tensorrt_options
from tlbuild.runtime.tensorrt import check_engine_version
from tlbuild.runtime.torch_model import TorchPredictor


def _auto_candidates(
    folder: Path, manifest: Manifest, artifact: str | None
) -> list[tuple[str, str]]:
    """(artifact, provider) pairs, fastest first for this machine: TensorRT engines, then CUDA,
    then the CPU. Each is tried in turn, so an engine built for another GPU, or a CUDA provider
    whose libraries are missing, falls through to the next with its reason kept."""
    cuda = provider_problem("cuda") is None
    if artifact is not None:
        if artifact.endswith(".engine"):
            return [(artifact, "tensorrt")]
        return ([(artifact, "cuda")] if cuda else []) + [(artifact, "cpu")]
    found: list[tuple[str, str]] = []
    engines = manifest.engine_entries()
    for variant in ("int8_trt", "fp16", "fp32"):
        e = engines.get(variant) or {}
        if e.get("status") == "accepted" and e.get("path"):
            found.append((e["path"], "tensorrt"))
    if cuda:
        found += [(ONNX_ARTIFACTS["fp16"].file, "cuda"), (MODEL_ONNX, "cuda")]
    found += [(n, "cpu") for n in CPU_ORDER]
    return [(n, p) for n, p in found if (folder / n).is_file() and manifest.accepted(n)]


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
            manifest.verify(folder, name)  # a corrupt copy is an error, not a fallback
            try:
                predictor = _open(folder, manifest, name, prov, threads, spinning, verified=True)
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
        order = CPU_ORDER if provider == "cpu" else (MODEL_ONNX,)
        artifact = next((n for n in order if (folder / n).is_file() and manifest.accepted(n)), "")
        if not artifact:
            raise UsageError(f"no usable artifact in {folder}; run `tlbuild run` first")
    return _open(folder, manifest, artifact, provider, threads, spinning)


def _open(
    folder: Path,
    manifest: Manifest,
    name: str,
    provider: str,
    threads: int | None,
    spinning: bool,
    verified: bool = False,
) -> Predictor:
    if not (folder / name).is_file():
        raise UsageError(f"no {name} in {folder}")
    if not verified:  # the provider="auto" loop hashes each candidate before trying it
        manifest.verify(folder, name)
    if not manifest.accepted(name):
        raise UsageError(f"{name} was rejected by the accuracy gate; see manifest.json variants")
    classes = list(manifest.classes)
    spec = Preprocessing.from_dict(manifest.preprocessing)
    if name.endswith(".pt"):
        return TorchPredictor(folder / name, device="cuda" if provider == "cuda" else "cpu")
    if name.endswith(".engine"):
        entry = next((e for e in manifest.engine_entries().values() if e.get("path") == name), {})
        check_engine_version(name, entry.get("trt_version"))
        return TensorRTPredictor(folder / name, classes, spec, precision_of(name))
    if is_image_model(name):
        if provider == "tensorrt":
            raise UsageError(
                f"{name} is not built into a TensorRT engine (its input size varies with the "
                "camera); run it with --provider cpu or cuda"
            )
        return ImageOnnxPredictor(
            folder / name,
            classes,
            spec,
            precision_of(name),
            OrtOptions(provider, threads, spinning),
        )
    if name.endswith(".onnx"):
        trt = None
        if provider == "tensorrt" and manifest.onnx is not None:
            # Every variant keeps model.onnx's input; the file was hashed by verify() above.
            first = manifest.onnx.inputs[0]
            known = (first["name"], first["shape"])
            trt = tensorrt_options(folder / name, known, manifest.artifacts[name].sha256)
        options = OrtOptions(provider, threads, spinning, tensorrt=trt)
        return OnnxPredictor(folder / name, classes, spec, precision_of(name), options)
    raise UsageError(f"{name}: not a model artifact (.onnx, .engine or .pt)")
