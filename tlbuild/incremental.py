"""Incremental builds: each stage is keyed by a hash of its inputs and rerun only when they change.

A stage's inputs are its recipe sections, the code that implements it, the run of each upstream
stage (run id and the sha256 of the files it wrote) and, for training, the dataset's file list
(sizes and modification times, or content hashes on request). `build_state.json` in the export
folder records, per stage, those input hashes, the sha256 of the files it wrote and when it ran.
A stage is fresh when its inputs hash the same and its files are still there, unchanged.

The state of a stage is removed before the stage starts and written after it has finished, and
every file is written under a temporary name then renamed: a killed run leaves the stage stale.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tlbuild
from tlbuild.data.scan import list_class_folders
from tlbuild.errors import DataError
from tlbuild.fileio import sha256_file, write_json
from tlbuild.recipe import Recipe

STATE_JSON = "build_state.json"
_PACKAGE = Path(tlbuild.__file__).parent


@dataclass(frozen=True)
class StageDef:
    """What a stage depends on and which files it owns."""

    name: str
    sections: tuple[str, ...]  # recipe sections (dotted keys excluded below)
    upstream: tuple[str, ...]
    code: tuple[str, ...]  # files or folders under tlbuild/
    outputs: tuple[str, ...]  # globs in the export folder, hashed after the stage
    data: bool = False
    machine: bool = False
    shared: tuple[str, ...] = ()  # files it writes that later stages update: must exist only


STAGES: tuple[StageDef, ...] = (
    StageDef(
        "train",
        ("data", "model", "train"),
        (),
        ("train", "models", "data", "export/checkpoint.py", "pipeline.py"),
        ("model.pt", "metrics.json", "history.csv", "splits.json", "*.png"),
        data=True,
    ),
    StageDef(
        "export",
        ("export",),
        ("train",),
        (
            "export/onnx_export.py",
            "export/parity.py",
            "export/manifest.py",
            "data/preprocess.py",
            "pipeline.py",
        ),
        ("model.onnx", "labels.json"),
        shared=("manifest.json",),
    ),
    StageDef(
        "quantize",
        ("quantize",),
        ("export",),
        ("export/quantize.py", "export/gate.py", "pipeline.py"),
        ("model.*.onnx",),
    ),
    StageDef(
        "build",
        ("build",),
        ("quantize",),
        ("export/tensorrt_build.py", "export/engines.py", "export/gate.py", "export/parity.py"),
        ("*.engine",),
        machine=True,
    ),
    StageDef(
        "bench",
        ("bench",),
        ("build",),
        ("bench", "runtime"),
        ("bench.json", "bench.parquet"),
        machine=True,
    ),
    StageDef(
        "report",
        ("gates",),
        ("bench",),
        ("report.py", "gates.py"),
        ("report.md", "report_*.png"),
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# Train's outputs glob *.png; the report's own plots are not training's.
_NOT_TRAIN = ("report_*.png",)
# Keys that change how fast a stage runs, not what it produces.
# (`fingerprint` is how data changes are seen, not what the data is: see data_digest.)
_IGNORED_KEYS = {"data": {"workers", "fingerprint", "cache_ram_mib"}}


def _earlier(name: str) -> tuple[str, ...]:
    return STAGE_NAMES[: STAGE_NAMES.index(name)]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_digest(parts: tuple[str, ...]) -> str:
    """sha256 over the source of the named modules/packages (and the tlbuild version)."""
    h = hashlib.sha256(tlbuild.__version__.encode())
    for part in parts:
        p = _PACKAGE / part
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(_PACKAGE)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _image_files(recipe: Recipe) -> list[Path]:
    """The files training reads: the same walk as the dataset scan (list_class_folders)."""
    d = recipe.data
    files: list[Path] = []
    for root in (p for p in (d.root, d.train, d.val, d.test) if p is not None):
        try:
            for paths in list_class_folders(root, d.extensions).values():
                files += paths
        except DataError:
            continue  # no class folders: training reports it; nothing to fingerprint
    return files


def data_digest(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """Digest of the dataset's file list (sizes + mtimes, or contents) and a short summary."""
    h = hashlib.sha256()
    total = 0
    files = _image_files(recipe)
    for f in files:
        h.update(str(f).encode())
        try:
            st = f.stat()
            if recipe.data.fingerprint == "content":
                h.update(bytes.fromhex(sha256_file(f)))
            else:
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:  # a broken link or unreadable file: training skips it, and so do we
            h.update(b"unreadable")
            continue
        total += st.st_size
    return h.hexdigest(), {"files": len(files), "bytes": total, "mode": recipe.data.fingerprint}


def _section(recipe: Recipe, name: str) -> Any:
    value = json.loads(getattr(recipe, name).model_dump_json())
    for key in _IGNORED_KEYS.get(name, ()):
        value.pop(key, None)
    return value


def _outputs(stage: StageDef, out: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for pattern in stage.outputs:
        for p in sorted(out.glob(pattern)):
            if p.is_file() and not (stage.name == "train" and _matches(p.name, _NOT_TRAIN)):
                found[p.name] = sha256_file(p)
    return found


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


class BuildState:
    """build_state.json of one export folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / STATE_JSON
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self.stages: dict[str, Any] = raw.get("stages", {})
        except (OSError, ValueError):
            self.stages = {}

    def inputs(
        self, stage: StageDef, recipe: Recipe, machine: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The hashes of everything `stage` depends on, by component."""
        comp: dict[str, Any] = {
            "recipe": _digest({s: _section(recipe, s) for s in stage.sections}),
            "code": code_digest(stage.code),
            # Every earlier stage, not only the direct one: with a stage disabled in between,
            # a retrain must still reach the benchmark and the report.
            "upstream": _digest(
                {
                    u: {
                        "run_id": self.stages.get(u, {}).get("run_id"),
                        "outputs": self.stages.get(u, {}).get("outputs"),
                    }
                    for u in _earlier(stage.name)
                }
            ),
        }
        if stage.data:
            comp["data"], comp["data_summary"] = data_digest(recipe)
        if stage.machine and machine is not None:
            comp["machine"] = _digest(machine)
        return comp

    def check(self, stage: StageDef, inputs: dict[str, Any]) -> tuple[bool, list[str]]:
        """(fresh, reasons it is not)."""
        old = self.stages.get(stage.name)
        if old is None:
            return False, ["never built (or its last run did not finish)"]
        why: list[str] = []
        before = old.get("inputs", {})
        if before.get("recipe") != inputs["recipe"]:
            why.append("recipe " + ", ".join(f"[{s}]" for s in stage.sections) + " changed")
        if before.get("code") != inputs["code"]:
            why.append("code changed (" + ", ".join(f"tlbuild/{c}" for c in stage.code) + ")")
        if before.get("upstream") != inputs["upstream"]:
            why.append(
                "an earlier stage (" + ", ".join(_earlier(stage.name)) + ") re-ran or changed"
            )
        if "data" in inputs and before.get("data") != inputs["data"]:
            was, now = before.get("data_summary") or {}, inputs["data_summary"]
            if was.get("mode") not in (None, now["mode"]):
                why.append(f"data.fingerprint changed to {now['mode']!r} (hashed differently)")
            else:
                why.append(
                    f"dataset changed ({now['files']:,} files, {now['bytes'] / 1e6:.1f} MB; "
                    f"was {was.get('files', 0):,} files, {was.get('bytes', 0) / 1e6:.1f} MB)"
                )
        if "machine" in inputs and before.get("machine") != inputs["machine"]:
            why.append("another machine or library versions")
        for name in stage.shared:
            if not (self.out / name).is_file():
                why.append(f"{name} is missing")
        for name, sha in old.get("outputs", {}).items():
            p = self.out / name
            if not p.is_file():
                why.append(f"{name} is missing")
            elif sha256_file(p) != sha:
                why.append(f"{name} was modified")
        return not why, why

    def start(self, stage: str) -> None:
        """Forget `stage` before it writes anything: killed midway, it stays stale."""
        if self.stages.pop(stage, None) is not None:
            self._save()

    def finish(self, stage: StageDef, inputs: dict[str, Any], seconds: float, summary: str) -> None:
        """Record a finished stage: its input hashes, output hashes and a fresh run id."""
        self.stages[stage.name] = {
            "run_id": uuid.uuid4().hex,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2),
            "summary": summary,
            "inputs": inputs,
            "outputs": _outputs(stage, self.out),
        }
        self._save()

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"format": "tlbuild.state/1", "stages": self.stages})
