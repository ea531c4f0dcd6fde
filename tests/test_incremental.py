"""Incremental builds, gates and the report: what reruns when, and what CI sees."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tlbuild import runner
from tlbuild.cli import app
from tlbuild.errors import RecipeError
from tlbuild.incremental import StageRecords
from tlbuild.recipe import load_recipe
from tlbuild.runner import STAGES

cli = CliRunner()
QUIET = Console(quiet=True)


def _copy_of_build(tiny_build: Path, tiny_data: Path, folder: Path, extra: str = "") -> Path:
    """A recipe whose export folder is a copy of the session's tiny build (same sections)."""
    recipe = tiny_recipe(folder, tiny_data, extra=extra)
    shutil.copytree(tiny_build, folder / "out" / "tiny")
    return recipe


def _actions(result: runner.RunResult) -> dict[str, str]:
    return {s.stage: s.action for s in result.stages}


def _rewrite(recipe: Path, old: str, new: str) -> None:
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new))


def test_a_copied_build_is_fresh_and_each_section_reruns_only_its_stages(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path)
    out = tmp_path / "out" / "tiny"
    model_mtime = (out / "model.pt").stat().st_mtime_ns

    first = _actions(runner.run(load_recipe(recipe), QUIET))
    assert first.pop("decision") == "disabled"  # the tiny recipe has no [decision]
    assert first.pop("track") == "disabled"  # nor [track]
    assert set(first.values()) == {"reused"}  # nothing to do, even in a new folder

    _rewrite(recipe, "min_iters = 5", "min_iters = 6")
    changed = _actions(runner.run(load_recipe(recipe), QUIET))
    assert changed == {
        "train": "reused",
        "export": "reused",
        "quantize": "reused",
        "image_models": "reused",
        "engines": "reused",
        "bench": "ran",
        "explain": "reused",  # heat maps follow training alone
        "novelty": "reused",  # follows the model and its variants, not the benchmark
        "decision": "disabled",
        "conformance": "reused",
        "report": "ran",
        "track": "disabled",
    }
    assert json.loads((out / "bench.json").read_text())["settings"]["min_iters"] == 6

    _rewrite(recipe, "parity_images = 8", "parity_images = 6")
    rows = {r.stage: r for r in runner.stage_status(load_recipe(recipe))}
    assert rows["train"].action == "fresh" and rows["export"].action == "stale"
    assert rows["export"].why == ["recipe [export] changed"]
    ran = _actions(runner.run(load_recipe(recipe), QUIET))
    assert ran["train"] == "reused"
    assert all(
        ran[s] == "ran"
        for s in (
            "export", "quantize", "image_models", "engines", "bench", "novelty", "conformance",
            "report",
        )
    )  # fmt: skip
    assert (out / "model.pt").stat().st_mtime_ns == model_mtime  # never retrained

    forced = _actions(runner.run(load_recipe(recipe), QUIET, force=("bench",)))
    assert forced["bench"] == "ran" and forced["quantize"] == "reused"


def test_status_says_why_a_stage_is_stale(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    recipe = tiny_recipe(tmp_path, data)
    out = tmp_path / "out" / "tiny"
    shutil.copytree(tiny_build, out)
    # Same files elsewhere: the copy has new paths, so training is stale with the reason.
    res = cli.invoke(app, ["status", str(recipe)], env={"COLUMNS": "200"})  # one line per row
    assert res.exit_code == 0 and "dataset changed" in res.output

    recipe = tiny_recipe(tmp_path, tiny_data)
    assert "stale" not in cli.invoke(app, ["status", str(recipe)]).output
    (out / "model.int8.cpu.onnx").write_bytes(b"tampered")
    (out / "model.onnx").unlink()
    rows = {r.stage: r for r in runner.stage_status(load_recipe(recipe))}
    assert "model.onnx is missing" in rows["export"].why
    assert "model.int8.cpu.onnx was modified" in rows["quantize"].why
    assert rows["train"].action == "fresh"


def test_a_new_image_makes_training_stale(
    tiny_data: Path, tiny_build: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, copy_function=shutil.copy2)
    recipe = tiny_recipe(tmp_path, data)
    out = tmp_path / "out" / "tiny"
    shutil.copytree(tiny_build, out)
    # Record training as built from this recipe and data folder as they are now.
    records = StageRecords(out)
    records.stages["train"]["inputs"] = records.inputs(STAGES[0], (), load_recipe(recipe), None)
    records._save()
    assert runner.stage_status(load_recipe(recipe))[0].action == "fresh"

    extra = data / "ok" / "ok_new.jpg"
    shutil.copy(next((data / "ok").glob("*.jpg")), extra)
    row = runner.stage_status(load_recipe(recipe))[0]
    assert row.action == "stale" and "dataset changed (33 files" in row.why[0]
    os.utime(extra, ns=(1, 1))  # a changed time counts too (content hashes on request)
    assert runner.stage_status(load_recipe(recipe))[0].action == "stale"


def test_a_stage_killed_midway_is_rerun(
    tiny_build: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path)
    _rewrite(recipe, "min_iters = 5", "min_iters = 7")

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # what a kill looks like from inside the stage

    monkeypatch.setattr("tlbuild.stages.bench.bench_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(load_recipe(recipe), QUIET)
    monkeypatch.undo()
    rows = {r.stage: r for r in runner.stage_status(load_recipe(recipe))}
    assert len(rows["bench"].why) == 1 and rows["bench"].why[0].endswith("did not finish")
    assert rows["quantize"].action == "fresh"
    out = tmp_path / "out" / "tiny"
    (out / ".model.int8.cpu.k3j2h1.tmp.onnx").write_bytes(b"half")  # a real kill leaves these
    ran = _actions(runner.run(load_recipe(recipe), QUIET))
    assert ran["bench"] == "ran" and ran["train"] == "reused"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no half-written files


def test_tightened_gates_fail_the_run_and_name_each_gate(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    gates = """
[gates]
min_accuracy = 0.0
max_escape_rate = 1.0
max_int8_drop = 100.0
max_p99_ms = { "model.int8.cpu.onnx" = { 1 = 100000.0 }, "model.fp16.*.engine" = { 4 = 1.0 } }
"""
    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path, extra=gates)
    res = cli.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "report" in res.output and "All 6 gates passed" not in res.output
    # The end of the run says what fine-tuning bought over the head-only stage, reused or not.
    assert "head only (stage 'head', body frozen)" in res.output
    assert "fine-tuning the body" in res.output
    out = tmp_path / "out" / "tiny"
    assert "head only (stage 'head', body frozen)" in (out / "report.md").read_text()
    verdict = json.loads((out / "gates.json").read_text())
    assert verdict["passed"]
    statuses = {g["gate"]: g["status"] for g in verdict["gates"]}
    assert statuses["max_p99_ms[model.fp16.*.engine, batch 4]"] == "not measured"

    _rewrite(recipe, "{ 1 = 100000.0 }", "{ 1 = 0.0001 }")
    _rewrite(recipe, "min_accuracy = 0.0", "min_accuracy = 1.0")
    res = cli.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 1
    assert (
        "max_p99_ms[model.int8.cpu.onnx on onnxruntime:CPUExecutionProvider, batch 1]" in res.output
    )
    assert "threshold 0.0001" in res.output and "measured" in res.output
    report = (out / "report.md").read_text()
    assert "**FAILED**" in report and "❌ FAILED" in report and "✅ passed" in report
    gates_after = json.loads((out / "gates.json").read_text())
    assert not gates_after["passed"] and len(gates_after["gates"]) == len(verdict["gates"])


def test_report_has_every_section_and_its_plots(tiny_build: Path) -> None:
    report = (tiny_build / "report.md").read_text()
    for heading in (
        "## Gates",
        "## Validation",
        "## Precision variants",
        "## TensorRT engines",
        "## Benchmark",
        "## Build stages",
    ):
        assert heading in report
    assert "escape rate" in report and "false-reject rate" in report
    for png in ("report_per_class.png", "report_latency_accuracy.png", "confusion_val.png"):
        assert f"]({png})" in report and (tiny_build / png).stat().st_size > 1000
    assert "`model.int8.cpu.onnx` | ort:CPU | 4 |" in report


def test_gate_typos_are_recipe_errors(tiny_data: Path, tmp_path: Path) -> None:
    bad = tiny_recipe(
        tmp_path, tiny_data, extra='[gates]\nmax_p99_ms = { "modle.onnx" = { 1 = 5 } }'
    )
    with pytest.raises(RecipeError, match="gates.max_p99_ms: .*'modle.onnx' is not an artifact"):
        load_recipe(bad)
    bad = tiny_recipe(
        tmp_path, tiny_data, extra='[gates]\nmax_p99_ms = { "model.onnx" = { 64 = 5 } }'
    )
    with pytest.raises(RecipeError, match="batch size 64, which bench does not measure"):
        load_recipe(bad)
    res = cli.invoke(app, ["run", str(tiny_recipe(tmp_path, tiny_data)), "--force", "nope"])
    assert res.exit_code == 2 and "not a stage" in res.output


def test_disabling_a_stage_removes_its_files_and_reruns_what_follows(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path, extra="[quantize]\nvariants = []")
    out = tmp_path / "out" / "tiny"
    ran = _actions(runner.run(load_recipe(recipe), QUIET))
    assert ran["quantize"] == "disabled" and ran["train"] == "reused"
    assert ran["bench"] == "ran" and ran["report"] == "ran"
    assert not list(out.glob("model.*.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "variants" not in manifest and "model.int8.cpu.onnx" not in manifest["artifacts"]
    bench = json.loads((out / "bench.json").read_text())
    assert {r["artifact"] for r in bench["results"]} == {
        "model.pt",
        "model.onnx",
        "model_image.onnx",  # the variants' image models went with them
    }
    assert [p.name for p in out.glob("model_image*")] == ["model_image.onnx"]
    assert set(_actions(runner.run(load_recipe(recipe), QUIET)).values()) <= {
        "reused",
        "disabled",
    }


def test_an_artifact_that_fails_in_the_benchmark_fails_the_gates(tmp_path: Path) -> None:
    from tlbuild.gates import evaluate_gates
    from tlbuild.recipe import GatesConfig

    bench = {
        "results": [],
        "skipped": [
            {"artifact": "model.fp16.onnx", "reason": "needs a GPU", "kind": "not here"},
            {"artifact": "model.onnx", "reason": "cannot load: boom", "kind": "failed"},
        ],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    gates = evaluate_gates(GatesConfig(max_p99_ms={"model.onnx": {1: 5.0}}), tmp_path)
    by_name = {g.gate: g for g in gates}
    assert by_name["runs[model.onnx]"].failed and "boom" in by_name["runs[model.onnx]"].note
    assert "runs[model.fp16.onnx]" not in by_name


def test_the_data_fingerprint_survives_a_symlink_loop(tiny_data: Path, tmp_path: Path) -> None:
    from tlbuild.incremental import data_digest

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    recipe = load_recipe(tiny_recipe(tmp_path, data))
    before = data_digest(recipe)
    os.symlink(data, data / "ok" / "loop")  # a loop training does not follow either
    assert data_digest(recipe) == before


def test_each_stage_is_one_module_keyed_on_the_code_it_imports() -> None:
    from tlbuild.incremental import module_closure

    package = Path(__file__).parent.parent / "tlbuild"
    assert [s.name for s in STAGES] == [
        *("train", "export", "quantize", "image_models", "engines", "bench", "explain"),
        *("novelty", "decision", "conformance", "report", "track"),
    ]
    code = {
        s.name: {p.relative_to(package).as_posix() for p in module_closure(s.module)}
        for s in STAGES
    }
    for s in STAGES:
        assert s.module == f"tlbuild.stages.{s.name}"
        others = {f"stages/{o.name}.py" for o in STAGES if o is not s}
        assert f"stages/{s.name}.py" in code[s.name] and not code[s.name] & others
    assert "data/synth.py" not in code["train"] and "train/trainer.py" in code["train"]
    assert not {"train/trainer.py", "export/quantize.py"} & code["export"]
    assert "export/quantize.py" in code["quantize"] and "train/trainer.py" not in code["quantize"]


def test_a_stage_whose_code_changed_reruns_alone_when_it_writes_the_same_files(
    tiny_build: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild import incremental

    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path)
    real = incremental.code_digest
    edited = "tlbuild.stages.quantize"  # as if how it prints its table had been edited
    monkeypatch.setattr(
        incremental, "code_digest", lambda m: real(m) + ("!" if m == edited else "")
    )
    ran = _actions(runner.run(load_recipe(recipe), QUIET))
    assert ran == {
        "train": "reused",
        "export": "reused",
        "quantize": "ran",
        "image_models": "reused",
        "engines": "reused",
        "bench": "reused",
        "explain": "reused",
        "novelty": "reused",
        "decision": "disabled",
        "conformance": "reused",
        "report": "reused",
        "track": "disabled",
    }
    out = tmp_path / "out" / "tiny"
    assert (out / "bench.json").is_file() and not (out / ".aside").exists()


def test_each_stage_writes_only_its_own_manifest_section(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from tlbuild.manifest import read_manifest, section_digest

    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path, extra="[quantize]\nmax_drop = 90.0")
    out = tmp_path / "out" / "tiny"
    before = {s: section_digest(out, s) for s in ("export", "quantize", "engines")}
    runner.run_one(load_recipe(recipe), QUIET, "quantize")
    after = {s: section_digest(out, s) for s in ("export", "quantize", "engines")}
    assert after["export"] == before["export"] and after["quantize"] != before["quantize"]
    manifest = read_manifest(out)
    # Engines read what quantize rewrote: their section and files are cleared, not kept stale.
    assert manifest.engines is None
    why = {r.stage: r.why for r in runner.stage_status(load_recipe(recipe))}["engines"]
    assert why == ["cleared: quantize ran again"]
    assert manifest.calibration is not None and manifest.calibration.settings["max_drop"] == 90.0
    owners = {name: e.stage for name, e in manifest.artifacts.items()}
    assert owners["model.onnx"] == "export" and owners["model.int8.cpu.onnx"] == "quantize"


def test_bench_dir_and_build_on_device_use_current_settings_not_a_stale_copy(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from tlbuild.export.engines import settings_for_folder as engine_settings

    recipe = _copy_of_build(tiny_build, tiny_data, tmp_path)
    out = tmp_path / "out" / "tiny"
    runner.run(load_recipe(recipe), QUIET, force=("export",))  # the manifest names this recipe
    _rewrite(recipe, "min_iters = 5", "min_iters = 6")
    res = cli.invoke(app, ["bench", str(out)])
    assert res.exit_code == 0, res.output
    assert f"Settings [bench] from {recipe}" in " ".join(res.output.split())
    assert json.loads((out / "bench.json").read_text())["settings"]["min_iters"] == 6
    _rewrite(recipe, "[export]", "[build]\nmax_batch = 16\n\n[export]")
    cfg, _, source = engine_settings(out)
    assert cfg.max_batch == 16 and source == f"from {recipe}"

    # On a device the recipe is not there: the settings recorded at home are used.
    device = tmp_path / "device"
    shutil.copytree(out, device)
    _rewrite(recipe, "min_iters = 6", "min_iters = 7")
    res = cli.invoke(app, ["bench", str(device)])
    assert res.exit_code == 0 and "recorded in manifest.json" in res.output
    # What the last bench stage at home used (`bench DIR` records nothing).
    assert json.loads((device / "bench.json").read_text())["settings"]["min_iters"] == 5
    cfg, max_drop, source = engine_settings(device)
    assert cfg.max_batch == 32 and source == "as recorded in manifest.json"


def test_status_of_a_new_folder_says_first_run(tiny_data: Path, tmp_path: Path) -> None:
    rows = runner.stage_status(load_recipe(tiny_recipe(tmp_path, tiny_data)))
    assert {r.stage: r.why for r in rows}["train"] == ["first run here"]


def test_report_shows_each_variants_speed_against_fp32() -> None:
    from tlbuild.report import _speed_vs_fp32

    def row(artifact: str, backend: str, batch: int, ips: float) -> dict:
        return {"artifact": artifact, "backend": backend, "batch": batch, "throughput_ips": ips}

    cpu, cuda, trt = (
        "onnxruntime:CPUExecutionProvider",
        "onnxruntime:CUDAExecutionProvider",
        "onnxruntime:TensorrtExecutionProvider",
    )
    bench = {
        "results": [
            row("model.onnx", cpu, 1, 100.0),
            row("model.onnx", cpu, 32, 300.0),
            row("model.int8.cpu.onnx", cpu, 1, 150.0),
            row("model.int8.cpu.onnx", cpu, 32, 600.0),
            row("model.onnx", cuda, 32, 1000.0),
            row("model.int8.trt.onnx", trt, 32, 4000.0),
        ]
    }
    assert _speed_vs_fp32(bench, "model.int8.cpu.onnx") == "2.00x (batch 32)"
    assert _speed_vs_fp32(bench, "model.int8.trt.onnx") == "4.00x (batch 32 vs FP32 on CUDA)"
    assert _speed_vs_fp32(bench, "model.fp16.onnx") == "-"
