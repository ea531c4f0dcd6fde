"""What `tlbuild classify` can be told, with each option's default and help in one place, and
the model an engine chose: shared by the run, its engines (local, Ray) and the command line,
which reads its defaults and help from here. Light to import (the command line does at start)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tlbuild.data.extensions import IMAGE_EXTENSIONS

# Rows per part file when --out is a folder: large enough for efficient Parquet readers, small
# enough that a killed run loses little (the open part).
PART_ROWS = 50_000


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the CLI's word for it
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs."""

    address: str | None = _opt(
        None,
        "Ray cluster: auto (the running one), local (a private one for this run) or "
        "ray://host:10001. Default: $RAY_ADDRESS if set, else local.",
    )
    actors: int | None = _opt(
        None, "Ray actors, each holding the model; default: what the cluster fits."
    )
    cpus_per_actor: float = _opt(1.0, "CPUs per Ray actor (ONNX Runtime and decode threads).")
    gpus_per_actor: float = _opt(0.0, "GPUs per Ray actor.")


@dataclass(frozen=True)
class ClassifyOptions:
    """Everything `tlbuild classify` can be told besides inputs, model and output."""

    artifact: str | None = _opt(None, "Artifact of the folder to use, e.g. model.onnx.")
    provider: str = _opt(
        "auto", "auto (fastest that starts here: TensorRT, CUDA, CPU), cpu, cuda, tensorrt."
    )
    batch_size: int = _opt(32, "Images per inference batch.")
    workers: int = _opt(0, "Decode threads; 0 = one per core.")
    topk: int = _opt(3, "Labels kept per image in topk_labels.")
    ok_class: str | None = _opt(None, "The good class; default: the model's ok_class.")
    threshold: float | None = _opt(
        None, "Defective when p(ok class) is below this (default: argmax rule)."
    )
    novelty: str = _opt(
        "auto",
        "Flag images unlike the training images for review: auto (the manifest's novelty "
        "threshold, if the build chose one), off, or a threshold (e.g. 4.5).",
    )
    # Full decode by default: on 2,000 640x480 camera frames the reduced-scale (draft) decode
    # changed 9 answers of the demo's INT8 model (0.45%), the whole escape budget of a line;
    # a client that decodes fully (any library) then agrees with classify.
    exact_decode: bool = _opt(
        True,
        "Full JPEG decode, bit-identical to training evaluation (default). --no-exact-decode "
        "decodes large JPEGs at a reduced DCT scale: faster, but it changed 0.45% of answers "
        "on 640x480 frames.",
    )
    extensions: tuple[str, ...] = _opt(
        IMAGE_EXTENSIONS,
        "Extensions taken from folders, comma-separated (default: every image type training "
        "reads, GIF included).",
    )
    overwrite: bool = _opt(False, "Start --out over instead of resuming it.")
    retry_errors: bool = _opt(
        False, "Classify again files whose earlier row is an error (a new row is added)."
    )
    max_error_rate: float | None = _opt(
        None, "Exit 1 if more than this fraction of inputs fail (e.g. 0.01)."
    )
    engine: str = _opt(
        "local",
        "local (this process) or ray (actors on a Ray cluster; pip install 'tlbuild[ray]').",
    )
    ray: RayOptions | None = None
    model_cache: Path | None = _opt(
        None,
        "Where an s3:// / gs:// --model is fetched (default: $TLBUILD_MODEL_CACHE or "
        "~/.cache/tlbuild/models).",
    )
    part_rows: int = _opt(PART_ROWS, "Rows per part file when --out is a folder.")
    compact: bool = _opt(
        False, "After the run, merge a folder --out's small part files (INPUTS optional)."
    )


def help_of(options: type, name: str) -> str:
    """The help text of option `name` of ClassifyOptions or RayOptions."""
    return next(f.metadata["help"] for f in fields(options) if f.name == name)


@dataclass(frozen=True)
class ModelChoice:
    """The artifact that will write the rows, as chosen where the model runs."""

    folder: Path  # a local copy: the manifest is read from it
    source: str  # what --model named (a URL is fetched again by each Ray node)
    artifact: str
    provider: str
    precision: str
    backend: str
    passed_over: tuple[str, ...] = ()


def provider_of(backend: str, artifact: str) -> str:
    """The --provider value that opens `artifact` on the backend a Predictor reported."""
    if artifact.endswith(".engine") or "Tensorrt" in backend:
        return "tensorrt"
    return "cuda" if "CUDA" in backend or backend.endswith(":cuda") else "cpu"
