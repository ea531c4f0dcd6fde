"""manifest.json: what was built, from what, how to feed it, and the sha256 of every artifact.

A typed model, read and written only through this module. Each stage owns a section (the
fields in OWNERS) and the artifact entries it hashed; `write_section` replaces that and leaves
every other stage's fields and hashes as they were.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tlbuild import __version__
from tlbuild.artifacts import is_image_model
from tlbuild.errors import UsageError
from tlbuild.fileio import plain_name, read_record_text, sha256_file, write_json

if TYPE_CHECKING:
    from tlbuild.recipe import Recipe

MANIFEST_JSON = "manifest.json"
M = TypeVar("M", bound=BaseModel)
FORMAT = "tlbuild.manifest/1"


class _Entry(BaseModel):
    # Unknown keys are kept: a newer tlbuild may add some, and a device must not drop them.
    model_config = ConfigDict(extra="allow")


class FileHash(_Entry):
    """sha256 and size of one artifact, and the stage that wrote it."""

    sha256: str
    bytes: int
    stage: str = ""


class ModelInfo(_Entry):
    """The network: backbone, where its pretrained weights came from, what it outputs."""

    backbone: str
    weights_source: str
    dropout: float
    output: str = "logits (apply softmax for probabilities)"


class OnnxInfo(_Entry):
    """model.onnx: opset, tensor names, shapes, and its parity check against PyTorch."""

    file: str
    opset: int | None
    input: str
    output: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parity: dict[str, Any]
    # The novelty features output and its layout; None for a model exported before them.
    features: dict[str, Any] | None = None


class Variant(_Entry):
    """One precision variant judged against FP32 on the validation split, and whether it ships."""

    variant: str
    file: str
    precision: str
    accuracy: float
    fp32_accuracy: float
    drop_points: float
    top1_agreement: float
    max_abs_logit_diff: float
    evaluated_with: str
    status: str = "accepted"
    # Of the validation images: answers that differ from FP32's, and a one-sided 95% upper
    # bound on the points lost (export/compare.drop_bound). None in folders built before.
    images: int | None = None
    answers_changed: int | None = None
    drop_upper_points: float | None = None
    # Rejected: why, what was tried, and only what was not (stages/quantize.py).
    reason: str | None = None
    # INT8 only: what the accuracy-aware search tried and chose (export/int8_search.py).
    search: dict[str, Any] | None = None


class Calibration(_Entry):
    """How the INT8 variants were calibrated, and the [quantize] settings used."""

    images: int
    method: str
    percentile: float | None = None
    keep_float: list[str] = []
    reduce_range_cpu: bool = False
    seed: int = 0
    file_list_sha256: str = ""
    settings: dict[str, Any] = {}


class Engines(_Entry):
    """The TensorRT stage: built engines with their gates, or why it was skipped."""

    status: str
    reason: str | None = None
    engines: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {}  # the [build] section used
    max_drop: float | None = None


class BenchSection(_Entry):
    """The [bench] settings the last benchmark at home used (a device's `bench DIR` reuses them)."""

    settings: dict[str, Any] = {}


class Novelty(_Entry):
    """The novelty score's file, threshold and what it achieved (tlbuild/stages/novelty.py);
    `tlbuild classify` flags images over the threshold by default."""

    file: str
    threshold: float
    target: float
    val: dict[str, Any]
    probe: dict[str, Any]
    artifacts: dict[str, Any] = {}

    @model_validator(mode="after")
    def _usable(self) -> Novelty:
        # A NaN threshold would flag nothing, silently.
        if not math.isfinite(self.threshold):
            raise ValueError(f"novelty threshold {self.threshold} is not a number")
        return self


class Decision(_Entry):
    """The [decision] threshold on p(ok) and what it achieved (tlbuild/stages/decision.py);
    `tlbuild classify` applies it by default."""

    threshold: float
    rule: str  # as classify writes it in decided_by, e.g. "p(ok)<0.83"
    ok_class: str
    target: dict[str, Any]  # {"max_escape_rate": 0.005}
    confidence: float
    require_upper_bound: bool = False
    met: bool = True

    @model_validator(mode="after")
    def _usable(self) -> Decision:
        # classify applies this threshold to every image: a NaN would pass every part as ok.
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold {self.threshold} is not a probability in (0, 1]")
        keys = ("max_escape_rate", "max_false_reject_rate")
        if len(self.target) != 1 or next(iter(self.target)) not in keys:
            raise ValueError(f"target must be one of {', '.join(keys)}")
        rate = next(iter(self.target.values()))
        if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"target rate {rate!r} is not a fraction")
        return self


class Manifest(BaseModel):
    """The whole manifest.json."""

    # Keys this version does not know (a newer tlbuild's) are kept through every rewrite.
    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    created: str = ""
    versions: dict[str, str] = {}
    # export
    name: str = ""
    classes: list[str] = []
    ok_class: str | None = None
    preprocessing: dict[str, Any] = {}
    model: ModelInfo | None = None
    onnx: OnnxInfo | None = None
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    recipe: dict[str, Any] = {}  # [data], [model], [train] as trained, [export] as exported
    recipe_file: str | None = None
    device_batch: dict[str, Any] | None = None  # file, images, sha256 (stages/export.py)
    # quantize
    variants: dict[str, Variant] = {}
    calibration: Calibration | None = None
    # engines
    engines: Engines | None = None
    # bench
    bench: BenchSection | None = None
    # novelty
    novelty: Novelty | None = None
    # decision
    decision: Decision | None = None
    # image_models: each model_image twin's record, keyed by its name
    image_models: dict[str, dict[str, Any]] = {}
    # conformance: the kit's folder, size and kit.json's sha256
    conformance: dict[str, Any] | None = None
    gates: dict[str, Any] = {}  # [gates] as the report stage judged them (`bench DIR` reuses)
    artifacts: dict[str, FileHash] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        # Every reader joins these names to the export folder (and a classify node fetches
        # them from storage into its cache), so one from a tampered manifest must not be able
        # to name a path outside it: checked here, once, for every reader.
        for name in self.file_names():
            if not plain_name(name):
                raise ValueError(f"{name!r} is not a plain file name in the export folder")
        for ok in (self.ok_class, self.decision.ok_class if self.decision else None):
            if ok is not None and self.classes and ok not in self.classes:
                raise ValueError(f"ok class {ok!r} is not one of the classes")
        if self.preprocessing:
            from tlbuild.data.preprocess import Preprocessing

            try:
                Preprocessing.from_dict(self.preprocessing)
            except ValueError as e:
                raise ValueError(f"preprocessing: {e}") from None
        return self

    def file_names(self) -> list[object]:
        """Every file name the manifest points at: artifacts, variants, engines, device batch."""
        names: list[object] = list(self.artifacts)
        names += [self.onnx.file] if self.onnx is not None else []
        names += [v.file for v in self.variants.values()]
        names += [e["path"] for e in self.engine_entries().values() if "path" in e]
        names += [r["file"] for r in self.image_models.values() if r.get("file")]
        if self.device_batch:
            names.append(self.device_batch.get("file"))
        return names

    def accepted(self, name: str) -> bool:
        """Whether the gates accepted this artifact (a variant or a TensorRT engine)."""
        for v in self.variants.values():
            if v.file == name:
                return v.status == "accepted"
        for e in self.engine_entries().values():
            if e.get("path") == name:
                return e.get("status") == "accepted"
        if is_image_model(name):
            return (self.image_models.get(name) or {}).get("file") == name
        return name in ("model.onnx", "model.pt")

    def engine_entries(self) -> dict[str, dict[str, Any]]:
        """Per engine variant, its record (empty where the stage was skipped or never ran)."""
        return self.engines.engines if self.engines is not None else {}

    def verify(self, folder: Path, name: str) -> None:
        """Refuse an artifact whose sha256 differs from the manifest (a corrupt or swapped copy)."""
        entry = self.artifacts.get(name)
        if entry is None:
            raise UsageError(f"{name} is not listed in {folder / MANIFEST_JSON}")
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name} is missing; copy the whole export folder")
        if sha256_file(folder / name) != entry.sha256:
            raise UsageError(
                f"{folder / name} does not match the sha256 in its manifest; re-copy it"
            )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; sections no stage wrote are left out."""
        data = self.model_dump(mode="json")
        keep = ("ok_class", "artifacts")
        return {k: v for k, v in data.items() if k in keep or v not in (None, {})}


# The fields each stage writes. Nothing else writes the manifest.
OWNERS: dict[str, tuple[str, ...]] = {
    "export": (
        "name",
        "classes",
        "ok_class",
        "preprocessing",
        "model",
        "onnx",
        "metrics",
        "training",
        "recipe",
        "recipe_file",
        "device_batch",
    ),
    "quantize": ("variants", "calibration"),
    "engines": ("engines",),
    "bench": ("bench",),
    "novelty": ("novelty",),
    "decision": ("decision",),
    "image_models": ("image_models",),
    "conformance": ("conformance",),
    "report": ("gates",),
}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the artifacts."""
    return {
        "tlbuild": __version__,
        "python": platform.python_version(),
        **{m: _version_of(m) for m in ("torch", "timm", "onnx", "onnxruntime", "numpy")},
        "tensorrt": _version_of("tensorrt"),
    }


def _version_of(module: str) -> str:
    # Recorded either way: a device compares TensorRT's with its own before reusing an engine,
    # and a device runs without torch, timm and onnx.
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or (tensorrt) its CUDA libraries are missing
        return "not installed"


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, or a UsageError saying what the folder lacks."""
    found = read_manifest_if_any(folder)
    if found is None:
        raise UsageError(f"{folder} has no {MANIFEST_JSON}; is it a tlbuild export folder?")
    return found


def read_manifest_if_any(folder: Path) -> Manifest | None:
    """The folder's manifest, None where there is none, a UsageError where it is unreadable."""
    path = folder / MANIFEST_JSON
    try:
        raw = json.loads(read_record_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e}); run `tlbuild run` again") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise UsageError(f"{path}: {where}: {first['msg']}; run `tlbuild run` again") from None


def recorded_settings(model: type[M], data: Any, folder: Path, where: str) -> M:
    """A recipe section as a stage recorded it in `folder`'s manifest, validated as a recipe's
    is; a UsageError naming the key where it is damaged."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in (where, *first["loc"]))
        raise UsageError(
            f"{folder / MANIFEST_JSON}: {key}: {first['msg']}; copy the export folder again"
        ) from None


def manifest_json(folder: Path) -> dict[str, Any]:
    """The folder's manifest as checked JSON, or {} where there is none (reports, gates)."""
    found = read_manifest_if_any(folder)
    return found.to_json() if found is not None else {}


def recipe_here(folder: Path, manifest: Manifest) -> Recipe | None:
    """The recipe file that built `folder`, read now, if it is here and still writes to it.

    `tlbuild bench DIR` and `build --on-device DIR` then use its current settings, not a copy
    recorded when some earlier stage ran.
    """
    from tlbuild.recipe import load_recipe

    if not manifest.recipe_file or not Path(manifest.recipe_file).is_file():
        return None
    try:
        recipe = load_recipe(Path(manifest.recipe_file))
    except Exception:  # edited into something invalid, or its data moved: not this folder's
        return None
    return recipe if recipe.out_dir.resolve() == folder.resolve() else None


def write_section(folder: Path, stage: str, fields: dict[str, Any], files: list[str]) -> Manifest:
    """Replace `stage`'s fields and its artifact hashes (of `files` that exist), atomically."""
    unknown = set(fields) - set(OWNERS[stage])
    assert not unknown, f"{stage} does not own manifest fields {unknown}"
    try:
        manifest = read_manifest_if_any(folder) or Manifest()
    except UsageError:  # damaged: it is rebuilt section by section as the stages rerun
        manifest = Manifest()
    data = manifest.model_dump()
    for key in OWNERS[stage]:
        data[key] = fields.get(key, getattr(Manifest(), key))
    data["artifacts"] = {k: v for k, v in data["artifacts"].items() if _owner(v) != stage}
    for name in files:
        p = folder / name
        if p.is_file():
            data["artifacts"][name] = {
                "sha256": sha256_file(p),
                "bytes": p.stat().st_size,
                "stage": stage,
            }
    return _write(folder, Manifest.model_validate(data))


def drop_section(folder: Path, stage: str) -> None:
    """Remove `stage`'s fields and artifact hashes (a stage turned off, or rerun upstream)."""
    manifest = read_manifest_if_any(folder) if stage in OWNERS else None
    if manifest is None:
        return
    empty = Manifest()
    has_fields = any(getattr(manifest, k) != getattr(empty, k) for k in OWNERS[stage])
    has_files = any(_owner(v.model_dump()) == stage for v in manifest.artifacts.values())
    if has_fields or has_files:
        write_section(folder, stage, {}, [])


def take_section(folder: Path, stage: str) -> dict[str, Any] | None:
    """Remove `stage`'s fields and artifact entries, returning them for `put_section`."""
    manifest = read_manifest_if_any(folder) if stage in OWNERS else None
    if manifest is None:
        return None
    data = manifest.model_dump(mode="json")
    saved = {
        "fields": {k: data[k] for k in OWNERS[stage]},
        "artifacts": {k: v for k, v in data["artifacts"].items() if _owner(v) == stage},
    }
    drop_section(folder, stage)
    return saved


def put_section(folder: Path, stage: str, saved: dict[str, Any]) -> None:
    """Write back exactly what `take_section` took (a section set aside, then kept)."""
    data = (read_manifest_if_any(folder) or Manifest()).model_dump(mode="json")
    data.update(saved["fields"])
    data["artifacts"].update(saved["artifacts"])
    _write(folder, Manifest.model_validate(data))


def _owner(entry: dict[str, Any]) -> str:
    # Entries from before stages were recorded per entry belong to export, which wrote them.
    return entry.get("stage") or "export"


def section_digest(folder: Path, stage: str) -> str | None:
    """sha256 of `stage`'s fields and hashes: what later stages' freshness depends on."""
    if stage not in OWNERS:
        return None
    try:
        manifest = read_manifest_if_any(folder)
    except UsageError:  # damaged: the stages that own sections are then stale, and rerun
        return "unreadable"
    if manifest is None:
        return None
    data = manifest.model_dump(mode="json")
    body = {k: data[k] for k in OWNERS[stage]}
    body["artifacts"] = {k: v for k, v in data["artifacts"].items() if _owner(v) == stage}
    return hashlib.sha256(json.dumps(_without_timings(body), sort_keys=True).encode()).hexdigest()


TIMINGS = frozenset({"seconds", "build_seconds"})  # how long; settings such as min_seconds stay


def _without_timings(value: Any) -> Any:
    # How long something took is not what it produced: a rerun that wrote the same files and
    # the same results leaves later stages fresh even though its timings differ.
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _write(folder: Path, manifest: Manifest) -> Manifest:
    manifest.format = FORMAT
    manifest.created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    manifest.versions = library_versions()
    write_json(folder / MANIFEST_JSON, manifest.to_json())
    return manifest
