from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tlbuild.cli import app
from tlbuild.runtime.tensorrt import tensorrt_status

runner = CliRunner()
no_trt = pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is present: skip path unused")


@no_trt
def test_run_records_the_engine_stage_as_skipped_with_the_reason(tiny_build: Path) -> None:
    engines = json.loads((tiny_build / "manifest.json").read_text())["engines"]
    assert engines["status"] == "skipped" and "tensorrt" in engines["reason"].lower()


@no_trt
def test_build_on_device_from_the_export_folder_alone(tiny_build: Path) -> None:
    res = runner.invoke(app, ["build", "--on-device", str(tiny_build)])
    assert res.exit_code == 0, res.output
    assert "TensorRT engines skipped" in res.output


def test_build_needs_exactly_one_source(tmp_path: Path) -> None:
    res = runner.invoke(app, ["build"])
    assert res.exit_code == 2 and "either RECIPE or --on-device" in res.output
    res = runner.invoke(app, ["build", "--on-device", str(tmp_path)])
    assert res.exit_code == 2 and "no manifest.json" in res.output
