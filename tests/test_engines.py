from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
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


class _FakeEngine:
    """Stands in for TensorRTEngine: ONNX Runtime FP32 logits, optionally with answers changed."""

    flip = 0  # how many images get another class

    def __init__(self, path: Path) -> None:
        from tlbuild.runtime import open_onnx

        self.path, self.min_batch, self.max_batch = path, 1, 8
        self._onnx = open_onnx(path.parent / "model.onnx")

    output_name = "logits"

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)["logits"]

    def run_all(self, x: np.ndarray) -> dict[str, np.ndarray]:
        y, features = self._onnx.logits_and_features(x)
        n = min(self.flip, len(y))
        y[:n] = np.roll(y[:n], 1, axis=1)
        _FakeEngine.flip -= n
        return {"logits": y, "features": features}


def _fake_tensorrt(
    monkeypatch: pytest.MonkeyPatch, fail: set[str] = frozenset(), raises: set[str] = frozenset()
) -> None:
    from tlbuild.errors import BuildError
    from tlbuild.export import engines, tensorrt_compile
    from tlbuild.export.tensorrt_compile import BatchProfile, EngineInfo

    def compile_engine(src: Path, out: Path, label: str, batches: BatchProfile, *rest):  # noqa: ANN002, ANN202
        if label in fail:
            raise BuildError(f"TensorRT failed to build an engine from {src.name}")
        if label in raises:  # what a trt.Builder that cannot initialise CUDA raises
            raise TypeError("pybind11::init(): factory function returned nullptr")
        lo, opt, hi = batches.min_batch, batches.opt_batch, batches.max_batch
        path = out / f"model.{label}.b{lo}-{hi}.sm87.trt10.3.engine"
        path.write_bytes(b"fake engine " + label.encode())
        return EngineInfo(path, label, lo, opt, hi, "10.3.0.26", "Orin", "8.7", 1.0, 256)

    monkeypatch.setattr(engines, "tensorrt_status", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(engines, "TensorRTEngine", _FakeEngine)
    monkeypatch.setattr(tensorrt_compile, "compile_engine", compile_engine)


def _device_copy(tiny_build: Path, tmp_path: Path) -> Path:
    device = tmp_path / "device"
    shutil.copytree(tiny_build, device)
    (device / "splits.json").unlink()  # a device has no training data
    return device


def test_on_device_engines_are_judged_on_the_shipped_validation_batch(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.export.engines import make_engines
    from tlbuild.manifest import read_manifest
    from tlbuild.recipe import EnginesConfig

    device = _device_copy(tiny_build, tmp_path)
    batch = read_manifest(device).device_batch
    assert batch and batch["images"] == 8 and (device / batch["file"]).is_file()
    _fake_tensorrt(monkeypatch)
    cfg = EnginesConfig(variants=("fp32", "int8_trt"), max_batch=8, on_fail="reject")
    _FakeEngine.flip = 0
    good = make_engines(device, cfg, 1.0, Console(quiet=True), None)
    fp32 = good["engines"]["fp32"]
    assert fp32["status"] == "accepted" and fp32["images"] == 8 and fp32["drop_points"] == 0
    assert fp32["trt_version"] == "10.3.0.26"
    # An engine that changes answers on real images is rejected (random inputs accepted it).
    _FakeEngine.flip = 3
    bad = make_engines(device, cfg, 1.0, Console(quiet=True), None)
    assert bad["engines"]["fp32"]["status"] == "rejected"
    assert bad["engines"]["fp32"]["top1_agreement"] < 1.0
    manifest = read_manifest(device)
    assert not manifest.accepted(bad["engines"]["fp32"]["path"])


def test_a_tampered_or_missing_device_batch_is_one_clear_message(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.errors import UsageError
    from tlbuild.export.engines import make_engines
    from tlbuild.recipe import EnginesConfig

    device = _device_copy(tiny_build, tmp_path)
    _fake_tensorrt(monkeypatch)
    (device / "device_batch.npz").write_bytes(b"changed")
    with pytest.raises(UsageError, match="does not match the sha256"):
        make_engines(device, EnginesConfig(), 1.0, Console(quiet=True), None)


@pytest.mark.parametrize(
    ("how", "reason", "error"),
    [
        # TensorRT says it could not build (a BuildError of ours).
        ("fail", "TensorRT failed to build", "failed to build"),
        # TensorRT raises its own exception (a Builder that cannot initialise CUDA).
        ("raises", "TypeError: pybind11", r"engine for model.int8.trt.onnx failed: TypeError"),
    ],
)
def test_one_engine_that_fails_to_build_follows_on_fail_and_the_others_go_on(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, reason: str,
    error: str,
) -> None:  # fmt: skip
    from tlbuild.errors import BuildError
    from tlbuild.export.engines import make_engines
    from tlbuild.recipe import EnginesConfig

    device = _device_copy(tiny_build, tmp_path)
    _fake_tensorrt(monkeypatch, **{how: {"int8-trt"}})
    _FakeEngine.flip = 0
    cfg = EnginesConfig(variants=("int8_trt", "fp32"), max_batch=8, on_fail="reject")
    done = make_engines(device, cfg, 1.0, Console(quiet=True), None)
    failed = done["engines"]["int8_trt"]
    assert failed["status"] == "failed" and failed["reason"].startswith(reason)
    assert done["engines"]["fp32"]["status"] == "accepted"  # built after the failure
    strict = cfg.model_copy(update={"on_fail": "error"})
    with pytest.raises(BuildError, match=error):
        make_engines(device, strict, 1.0, Console(quiet=True), None)


def test_an_engine_from_another_tensorrt_version_is_refused_before_loading(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.errors import UsageError
    from tlbuild.runtime import load, tensorrt

    device = _device_copy(tiny_build, tmp_path)
    _fake_tensorrt(monkeypatch)
    from tlbuild.export.engines import make_engines
    from tlbuild.recipe import EnginesConfig

    _FakeEngine.flip = 0
    done = make_engines(
        device, EnginesConfig(variants=("fp32",), max_batch=8), 1.0, Console(quiet=True), None
    )
    engine = done["engines"]["fp32"]["path"]
    monkeypatch.setattr(tensorrt, "installed_trt_version", lambda: "10.3.0.30")

    def must_not_load(*args: object) -> None:
        raise AssertionError("deserialized an engine of another TensorRT version")

    monkeypatch.setattr(load, "TensorRTPredictor", must_not_load)
    with pytest.raises(UsageError, match=r"TensorRT 10.3.0.26 and this machine has 10.3.0.30"):
        load.load_predictor(device, artifact=engine, provider="tensorrt")
    monkeypatch.setattr(tensorrt, "installed_trt_version", lambda: "10.3.0.26")
    with pytest.raises(AssertionError, match="deserialized"):  # same version: it goes on to load
        load.load_predictor(device, artifact=engine, provider="tensorrt")


def test_fp32_engines_never_run_in_tf32() -> None:
    from types import SimpleNamespace

    from tlbuild.export.tensorrt_compile import _no_tf32_for_fp32

    class Config:
        def __init__(self) -> None:
            self.flags = {"TF32"}

        def clear_flag(self, f: str) -> None:
            self.flags.discard(f)

        def get_flag(self, f: str) -> bool:
            return f in self.flags

    trt = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32="TF32"))
    fp32, fp16 = Config(), Config()
    assert _no_tf32_for_fp32(trt, fp32, "fp32") is False and "TF32" not in fp32.flags
    assert _no_tf32_for_fp32(trt, fp16, "fp16") is True and "TF32" in fp16.flags
    assert _no_tf32_for_fp32(SimpleNamespace(), Config(), "fp32") is False  # no such flag


def test_a_missing_device_batch_is_refused_before_any_engine_is_removed(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild.errors import UsageError
    from tlbuild.export.engines import make_engines
    from tlbuild.recipe import EnginesConfig

    device = _device_copy(tiny_build, tmp_path)
    _fake_tensorrt(monkeypatch)
    shipped = device / "model.fp16.b1-32.sm87.trt10.3.engine"
    shipped.write_bytes(b"an engine that works here")
    (device / "device_batch.npz").unlink()
    with pytest.raises(UsageError, match="device_batch.npz is missing; copy the whole"):
        make_engines(device, EnginesConfig(), 1.0, Console(quiet=True), None)
    assert shipped.is_file()
