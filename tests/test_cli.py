from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_recipe, write_recipe
from tlbuild.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["run"],
        ["train"],
        ["export"],
        ["quantize"],
        ["build"],
        ["check"],
        ["backbones"],
        ["explain"],
        ["data", "synth-defects"],
    ],
)
def test_help_everywhere(args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_empty_class_fails_the_build_with_one_message(data_copy: Path, tmp_path: Path) -> None:
    (data_copy / "dent").mkdir()
    res = runner.invoke(app, ["run", str(tiny_recipe(tmp_path, data_copy))])
    assert res.exit_code == 1
    assert "class 'dent' has 0 usable image(s)" in res.output
    assert "Traceback" not in res.output


def test_export_before_train_is_a_usage_error(tiny_data: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", str(tiny_recipe(tmp_path, tiny_data))])
    assert res.exit_code == 2 and "run `tlbuild train` first" in res.output


def test_missing_recipe_and_bad_synth_arguments(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "recipe not found" in res.output
    res = runner.invoke(app, ["data", "synth-defects", str(tmp_path / "d"), "--per-class", "0"])
    assert res.exit_code == 2 and "per_class" in res.output


def test_backbones_lists_offline_weights() -> None:
    res = runner.invoke(app, ["backbones"])
    assert res.exit_code == 0
    line = next(ln for ln in res.output.splitlines() if "tf_efficientnet_lite0" in ln)
    assert "bundled" in line


def test_synth_defects_cli_writes_class_folders(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["data", "synth-defects", str(tmp_path / "d"), "--per-class", "2", "--size", "48"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["crack", "ok", "scratch", "spot"]
    assert len(list((tmp_path / "d").rglob("*.jpg"))) == 8


def test_unwritable_output_dir_is_a_usage_error(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file where the export folder should go")
    res = runner.invoke(app, ["train", str(tiny_recipe(tmp_path, tiny_data))])
    assert res.exit_code == 2 and "cannot write to the export folder" in res.output


def test_image_gone_before_export_is_one_clear_message(tiny_build: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = tmp_path / "out" / "tiny"
    shutil.copytree(tiny_build, copy)
    splits = json.loads((copy / "splits.json").read_text())
    splits["val"][0][0] = str(tmp_path / "vanished.jpg")
    (copy / "splits.json").write_text(json.dumps(splits))
    recipe = (tiny_build.parent.parent / "tiny.toml").read_text()
    res = runner.invoke(app, ["export", str(write_recipe(tmp_path / "tiny.toml", recipe))])
    assert res.exit_code == 1, res.output
    assert "vanished.jpg: file not found" in res.output and "Traceback" not in res.output


def test_device_requirements_pin_what_the_package_pins_and_the_installer_refuses_a_typo(
    tmp_path: Path,
) -> None:
    import subprocess
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    from packaging.requirements import Requirement

    def reqs(lines: list[str]) -> dict[str, str]:
        out = {}
        for line in lines:
            line = line.split("#")[0].strip()
            if line:
                r = Requirement(line)
                out[r.name.lower()] = str(r.specifier)
        return out

    package = reqs(project["dependencies"])
    scripts = root / "tlbuild" / "device"
    for target in ("cpu", "jetpack6", "cuda12", "cuda13"):
        lines = (scripts / f"requirements-{target}.txt").read_text().splitlines()
        device = reqs(lines)
        # Every library both need is pinned alike (the device side only drops training's).
        # onnxruntime-gpu is the exception: each GPU target pins the releases built for its
        # CUDA major (1.26 is the last for CUDA 12), where the package takes any.
        for name, spec in device.items():
            if name in package and name != "onnxruntime-gpu":
                assert spec == package[name], (target, name)
        assert not {"torch", "torchvision", "timm", "onnx"} & set(device)
    cuda12, cuda13 = (
        reqs((scripts / f"requirements-{t}.txt").read_text().splitlines())["onnxruntime-gpu"]
        for t in ("cuda12", "cuda13")
    )
    assert "<1.27" in cuda12 and ">=1.27" in cuda13
    extras = project["optional-dependencies"]
    assert reqs(extras["tensorrt"])["cuda-python"] == "<13,>=12"  # never CUDA 13 by accident
    done = subprocess.run(
        ["bash", str(scripts / "install.sh"), "cuda11"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "no requirements for target 'cuda11'" in done.stderr
