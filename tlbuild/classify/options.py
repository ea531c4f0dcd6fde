"""What `tlbuild classify` can be told, and the model an engine chose: shared by the run, its
engines (local, Ray) and the command line, so none of them imports another for these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tlbuild.classify.dataset_out import PART_ROWS
from tlbuild.classify.storage import default_model_cache, local_model
from tlbuild.data.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs."""

    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else "local"
    actors: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass(frozen=True)
class ClassifyOptions:
    """Everything `tlbuild classify` can be told besides inputs, model and output."""

    artifact: str | None = None
    provider: str = "auto"
    batch_size: int = 32
    workers: int = 0  # decode threads; 0 = one per core
    topk: int = 3
    ok_class: str | None = None  # None: the model's ok_class from its manifest, if any
    threshold: float | None = None
    exact_decode: bool = False
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    overwrite: bool = False
    retry_errors: bool = False
    max_error_rate: float | None = None
    engine: str = "local"  # a name in classify/run.ENGINES
    ray: RayOptions | None = None
    model_cache: Path | None = None  # where a --model URL is fetched; None: the default cache
    part_rows: int = PART_ROWS  # rows per part file when --out is a folder
    compact: bool = False  # merge small part files after the run


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


def local_model_path(model: str, options: ClassifyOptions) -> Path:
    """--model on this machine: a local path as it is, a URL fetched once into the cache."""
    return local_model(model, options.model_cache or default_model_cache(), options.artifact)
