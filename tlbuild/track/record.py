"""What one build tells an experiment tracker, read from its export folder: the resolved recipe
as parameters, the figures as metrics, training's history per epoch, tags that say which code
and which data, and the files worth keeping. Plain data; no tracker is contacted here."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlbuild import __version__
from tlbuild.artifacts import METRICS_JSON
from tlbuild.fileio import read_json_or_empty
from tlbuild.gates import GATES_JSON
from tlbuild.incremental import StageRecords
from tlbuild.manifest import MANIFEST_JSON, manifest_json
from tlbuild.recipe import Recipe
from tlbuild.report import REPORT_MD
from tlbuild.report_html import REPORT_HTML

# MLflow's key alphabet (word characters, any script, and - . / space); others become "_".
_KEY = re.compile(r"[^\w\-./ ]")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_PARAM = 6000  # characters MLflow keeps of a parameter's value
HISTORY_CSV = "history.csv"
# Kept with the run: the report, the manifest and the figures behind them.
LOGGED_FILES = (REPORT_HTML, REPORT_MD, MANIFEST_JSON, GATES_JSON, METRICS_JSON, "bench.json")


def key(text: str) -> str:
    """`text` as an MLflow parameter, metric or tag key."""
    return _KEY.sub("_", text)


@dataclass
class BuildRecord:
    """Everything logged for one build."""

    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (epoch, values)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def flatten_params(value: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys for nested sections; a list, or a table keyed by names that are not
    identifiers (per-artifact gates), stays one JSON value."""
    if isinstance(value, dict) and value and all(_IDENT.match(str(k)) for k in value):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten_params(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {key(prefix): text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"}


def _numbers(section: dict[str, Any], prefix: str) -> dict[str, float]:
    """Every number in `section` (nested dicts too), under dotted keys."""
    out: dict[str, float] = {}
    for k, v in section.items():
        name = f"{prefix}.{k}"
        if isinstance(v, bool | int | float):
            out[key(name)] = float(v)
        elif isinstance(v, dict):
            out.update(_numbers(v, name))
    return out


def _metrics(out: Path) -> dict[str, float]:
    metrics = read_json_or_empty(out / METRICS_JSON)
    manifest = manifest_json(out)
    found: dict[str, float] = {}
    for split in ("val", "test"):
        if split in metrics:
            found.update(_numbers(metrics[split], split))
    if metrics.get("head_only", {}).get("accuracy") is not None:
        found["head_only.accuracy"] = float(metrics["head_only"]["accuracy"])
    for name, v in manifest.get("variants", {}).items():
        for field_name in ("accuracy", "drop_points", "drop_upper_points", "answers_changed"):
            if v.get(field_name) is not None:
                found[key(f"variant.{name}.{field_name}")] = float(v[field_name])
        found[key(f"variant.{name}.accepted")] = float(v.get("status") == "accepted")
    for r in read_json_or_empty(out / "bench.json").get("results", []):
        backend = r["backend"].replace("onnxruntime:", "ort_").replace("ExecutionProvider", "")
        base = f"bench.{r['artifact']}.{backend}.b{r['batch']}"
        for field_name in ("p50_ms", "p99_ms", "throughput_ips", "accuracy"):
            if r.get(field_name) is not None:
                found[key(f"{base}.{field_name}")] = float(r[field_name])
    decision = manifest.get("decision")
    if decision:
        found["decision.threshold"] = float(decision["threshold"])
        for stat in ("escapes", "false_rejects"):
            found[f"decision.val.{stat}_rate"] = float(decision["val"][stat]["rate"])
    novelty = manifest.get("novelty")
    if novelty:
        found["novelty.threshold"] = float(novelty["threshold"])
        found["novelty.val_flagged"] = float(novelty["val"]["flagged"])
        found["novelty.faults_flagged"] = float(novelty["probe"]["faults_flagged"])
    return found


def _gates(out: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Counts and each gate's measured value as metrics; each gate's verdict as a tag."""
    gates = read_json_or_empty(out / GATES_JSON).get("gates", [])
    metrics = {
        "gates.passed": float(sum(g["status"] == "passed" for g in gates)),
        "gates.failed": float(sum(g["status"] == "failed" for g in gates)),
    }
    tags = {}
    for g in gates:
        if g.get("measured") is not None:
            metrics[key(f"gate.{g['gate']}")] = float(g["measured"])
        tags[key(f"gate.{g['gate']}")] = f"{g['status']} (threshold {g['threshold']:g})"
    tags["tlbuild.gates"] = "failed" if metrics["gates.failed"] else "passed"
    return metrics, tags


def _history(out: Path) -> list[tuple[int, dict[str, float]]]:
    path = out / HISTORY_CSV
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for k, v in row.items():
                if k in ("epoch", "stage") or v in ("", None):
                    continue
                try:
                    values[key(k)] = float(v)
                except ValueError:
                    continue
            rows.append((int(row["epoch"]), values))
    return rows


def _git(folder: Path) -> dict[str, str]:
    """The commit of the repository the recipe is in, and whether it had uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"tlbuild.git_commit": "unknown (the recipe is not in a git repository)"}
    status = git("status", "--porcelain")
    tags = {"tlbuild.git_commit": commit, "mlflow.source.git.commit": commit}
    tags["tlbuild.git_dirty"] = "unknown" if status is None else str(bool(status)).lower()
    return tags


def build_record(out: Path, recipe: Recipe) -> BuildRecord:
    """The record of the build in `out`, made with `recipe`."""
    record = BuildRecord()
    record.params = flatten_params(recipe.to_jsonable())
    record.metrics = _metrics(out)
    gate_metrics, gate_tags = _gates(out)
    record.metrics.update(gate_metrics)
    record.history = _history(out)
    train = (StageRecords(out).finished("train") or {}).get("inputs", {})
    summary = train.get("data_summary", {})
    record.tags = {
        "tlbuild.recipe": recipe.name,
        "tlbuild.version": __version__,
        "tlbuild.export_folder": str(out),
        "tlbuild.data_fingerprint": str(train.get("data", "unknown")),
        "tlbuild.data_files": str(summary.get("files", "unknown")),
        **gate_tags,
        **_git(recipe.source.parent if recipe.source else Path.cwd()),
    }
    record.files = [out / n for n in LOGGED_FILES if (out / n).is_file()]
    if recipe.source is not None and recipe.source.is_file():
        record.files.append(recipe.source)
    return record
