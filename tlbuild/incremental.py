"""Incremental builds: each stage is keyed by a hash of its inputs and rerun only when they change.

A stage's key covers its recipe sections, the source of every tlbuild module it imports
(followed through imports, so editing how one stage prints reruns that stage only), what the
earlier stages produced (the sha256 of their files and manifest sections: a stage that reruns
and writes the same bytes leaves later stages fresh) and, for training, the dataset's file list
(sizes and modification times, or content hashes on request). `build_state.json` in the export
folder records, per stage, those input hashes, the sha256 of the files it wrote and when it ran.
A stage is fresh when its inputs hash the same and its files are still there, unchanged.

A stage is marked started before it writes anything and finished after, and every file is
written under a temporary name then renamed: a killed run leaves the stage stale.
"""

from __future__ import annotations

import ast
import datetime as dt
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import tlbuild
from tlbuild.data.scan import list_class_folders
from tlbuild.errors import DataError
from tlbuild.fileio import plain_name, read_record_text, sha256_file, write_json
from tlbuild.manifest import section_digest
from tlbuild.recipe import Recipe

STATE_JSON = "build_state.json"
FORMAT = "tlbuild.state/3"
_PACKAGE = Path(tlbuild.__file__).parent
# Imported by every stage, yet they cannot change what a stage produces: the recipe's values
# are keyed on their own (its sections), errors only word messages, and the stage interface
# only describes stages. Following them would rerun every stage for any edit there.
_NOT_CODE_INPUTS = frozenset({"tlbuild.recipe", "tlbuild.errors", "tlbuild.stages.base"})


class StageInfo(Protocol):
    """What keying needs to know about a stage (tlbuild.stages.base.Stage)."""

    name: str
    sections: tuple[str, ...]
    module: str
    data: bool
    machine: bool
    ignored_keys: dict[str, frozenset[str]]

    def files(self, out: Path) -> list[Path]: ...


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _module_path(name: str) -> Path | None:
    rel = Path(*name.split(".")[1:])
    for p in (_PACKAGE / rel.with_suffix(".py"), _PACKAGE / rel / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(path: Path, package: str) -> set[str]:
    """tlbuild modules `path` imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            # `from tlbuild.data import scan` imports the module tlbuild.data.scan.
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "tlbuild" or m.startswith("tlbuild.")}


@functools.cache
def module_closure(name: str) -> tuple[Path, ...]:
    """Source files of `name` and of every tlbuild module it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [name]
    while todo:
        mod = todo.pop()
        if mod in seen or mod in _NOT_CODE_INPUTS or mod == "tlbuild":
            continue
        path = _module_path(mod)
        if path is None:  # a name imported from a module, not a module
            continue
        seen[mod] = path
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        todo += sorted(_imports(path, package))
    return tuple(sorted(seen.values()))


def code_digest(module: str) -> str:
    """sha256 over the source a stage module runs (its import closure) and the tlbuild version."""
    h = hashlib.sha256(tlbuild.__version__.encode())
    for f in module_closure(module):
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
                h.update(bytes.fromhex(sha256_file(f)))  # regular files only: never blocks
            else:
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:  # a broken link or unreadable file: training skips it, and so do we
            h.update(b"unreadable")
            continue
        total += st.st_size
    return h.hexdigest(), {"files": len(files), "bytes": total, "mode": recipe.data.fingerprint}


def _section(recipe: Recipe, stage: StageInfo, name: str) -> Any:
    value = json.loads(getattr(recipe, name).model_dump_json())
    for key in stage.ignored_keys.get(name, ()):
        value.pop(key, None)
    return value


class StageRecords:
    """build_state.json of one export folder: per stage, what it ran from and what it wrote."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / STATE_JSON
        self.stages: dict[str, Any] = {}
        self.older = False  # written by a tlbuild before stages were keyed as they are now
        try:
            raw = json.loads(read_record_text(self.path))
        except (OSError, ValueError):
            return
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            self.older = True
            return
        stages = raw.get("stages")
        # A damaged record is no record: that stage reruns (never a traceback, and never a
        # file name that would be hashed from outside the folder).
        self.stages = {
            k: v for k, v in (stages if isinstance(stages, dict) else {}).items() if _usable(v)
        }

    def finished(self, name: str) -> dict[str, Any] | None:
        """The record of `name`'s last finished run, or None."""
        rec = self.stages.get(name)
        return rec if rec is not None and "finished" in rec else None

    def inputs(
        self,
        stage: StageInfo,
        earlier: Sequence[StageInfo],
        recipe: Recipe,
        machine: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The hashes of everything `stage` depends on, by component."""
        comp: dict[str, Any] = {
            "recipe": _digest({s: _section(recipe, stage, s) for s in stage.sections}),
            "code": code_digest(stage.module),
            # Every earlier stage, not only the previous one: with a stage disabled in between,
            # a retrain must still reach the benchmark and the report. One digest per stage,
            # so the next run can name the one that changed.
            "upstream": {
                e.name: _digest((self.finished(e.name) or {}).get("outputs")) for e in earlier
            },
        }
        if stage.data:
            comp["data"], comp["data_summary"] = data_digest(recipe)
        if stage.machine and machine is not None:
            comp["machine"] = _digest(machine)
        return comp

    def check(self, stage: StageInfo, inputs: dict[str, Any]) -> tuple[bool, list[str]]:
        """(fresh, reasons it is not)."""
        rec = self.stages.get(stage.name)
        if rec is None:
            return False, ["recorded by an older tlbuild" if self.older else "first run here"]
        if "finished" not in rec:
            started = rec.get("started", "an earlier time")
            return False, [rec.get("why_stale") or f"its run of {started} did not finish"]
        why: list[str] = []
        before = rec.get("inputs", {})
        if before.get("recipe") != inputs["recipe"]:
            why.append("recipe " + ", ".join(f"[{s}]" for s in stage.sections) + " changed")
        if before.get("code") != inputs["code"]:
            why.append(f"code changed ({stage.module} or a module it imports)")
        was = before.get("upstream", {})
        if was != inputs["upstream"]:
            changed = [n for n, d in inputs["upstream"].items() if was.get(n) != d]
            why.append(f"{', '.join(changed) or 'an earlier stage'} produced something new")
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
        for name, sha in rec.get("outputs", {}).get("files", {}).items():
            p = self.out / name
            if not p.is_file():
                why.append(f"{name} is missing")
            elif sha256_file(p) != sha:
                why.append(f"{name} was modified")
        section = rec.get("outputs", {}).get("manifest")
        if section is not None and section != section_digest(self.out, stage.name):
            why.append("its manifest.json section is missing or was modified")
        return not why, why

    def outputs(self, stage: StageInfo) -> dict[str, Any]:
        """sha256 of the files `stage` wrote and of its manifest section."""
        # Relative to the folder: a top-level file's key is its name, a kit file's its path.
        files = {p.relative_to(self.out).as_posix(): sha256_file(p) for p in stage.files(self.out)}
        return {"files": files, "manifest": section_digest(self.out, stage.name)}

    def start(self, name: str) -> None:
        """Mark `name` started before it writes anything: killed midway, it stays stale."""
        self.stages[name] = {"started": _now()}
        self._save()

    def forget(self, name: str, why: str) -> None:
        """Make `name` stale with a reason (its files were removed)."""
        if name in self.stages:
            self.stages[name] = {"started": _now(), "why_stale": why}
            self._save()

    def drop(self, name: str) -> None:
        """No record at all (a stage turned off in the recipe)."""
        if self.stages.pop(name, None) is not None:
            self._save()

    def finish(
        self, stage: StageInfo, inputs: dict[str, Any], seconds: float, summary: str
    ) -> dict[str, Any]:
        """Record a finished stage: its input hashes and output hashes; returns the outputs."""
        outputs = self.outputs(stage)
        self.stages[stage.name] = {
            "started": self.stages.get(stage.name, {}).get("started", _now()),
            "finished": _now(),
            "seconds": round(seconds, 2),
            "summary": summary,
            "inputs": inputs,
            "outputs": outputs,
        }
        self._save()
        return outputs

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"format": FORMAT, "stages": self.stages})


def _usable(rec: Any) -> bool:
    """Whether a stage record read back has the shape this module writes."""
    if not isinstance(rec, dict):
        return False
    if "finished" not in rec:
        return True  # started, not finished: stale whatever else it holds
    outputs = rec.get("outputs")
    files = outputs.get("files") if isinstance(outputs, dict) else None
    return (
        isinstance(rec.get("inputs"), dict)
        and isinstance(files, dict)
        and all(_inside(n) for n in files)
    )


def _inside(name: object) -> bool:
    """A path relative to the export folder that stays inside it (conformance/images/a.jpg)."""
    return isinstance(name, str) and all(plain_name(part) for part in name.split("/"))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
