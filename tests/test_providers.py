"""Where the stages after training run their ONNX models: ONNX Runtime's CUDA provider when one
starts here (faked on machines without a GPU), the CPU otherwise, int8_cpu on the CPU always."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from rich.console import Console

from tests.conftest import run_stage, tiny_recipe
from tlbuild.bench.run import targets
from tlbuild.data.preprocess import Preprocessing, load_batch
from tlbuild.data.splits_file import read_split
from tlbuild.manifest import read_manifest
from tlbuild.recipe import load_recipe
from tlbuild.runtime.backends import open_onnx
from tlbuild.runtime.providers import Placement, placement_for, provider_problem

CUDA = "CUDAExecutionProvider"


class FakeGpu:
    """onnxruntime as if a CUDA GPU were here: a session asked for CUDA runs on the CPU and
    reports CUDA as its provider; every request is kept as (model, providers asked for)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[tuple[str, list[Any]]] = []
        real, available = ort.InferenceSession, ort.get_available_providers()
        fake = self

        class Session:
            def __init__(
                self, model: Any, sess_options: Any = None, providers: Any = None, **kw: Any
            ) -> None:
                asked = list(providers or ["CPUExecutionProvider"])
                name = "probe" if isinstance(model, bytes) else Path(model).name
                fake.requests.append((name, asked))
                self._session = real(model, sess_options, providers=["CPUExecutionProvider"])
                self._names = [p[0] if isinstance(p, tuple) else p for p in asked]

            def get_providers(self) -> list[str]:
                return self._names

            def __getattr__(self, key: str) -> Any:
                return getattr(self._session, key)

        monkeypatch.setattr(ort, "InferenceSession", Session)
        with_cuda = [CUDA, *(p for p in available if p != CUDA)]
        monkeypatch.setattr(ort, "get_available_providers", lambda: with_cuda)

    def providers_of(self, model: str) -> list[list[str]]:
        """The providers each session of `model` asked for, first choice first."""
        return [
            [p[0] if isinstance(p, tuple) else p for p in asked]
            for name, asked in self.requests
            if name == model
        ]

    def device_ids(self) -> set[str]:
        return {
            p[1]["device_id"]
            for _, asked in self.requests
            for p in asked
            if isinstance(p, tuple) and p[0] == CUDA
        }


@pytest.mark.skipif(
    provider_problem("cuda") is None, reason="a CUDA provider starts here: nothing to refuse"
)
def test_a_cuda_provider_that_cannot_start_is_named_once_and_quietly(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # onnxruntime-gpu lists CUDA wherever it is installed; on a machine without a GPU the
    # session falls back to the CPU and ONNX Runtime prints C++ errors. tlbuild says why in
    # one line and lets none of that reach the terminal.
    why = provider_problem("cuda")
    assert why is not None and CUDA in why
    assert capfd.readouterr() == ("", "")
    assert placement_for("cpu") == Placement()
    explicit = placement_for("cuda:1")
    assert explicit.provider == "cpu" and CUDA in explicit.why_cpu


def _copy(tiny_build: Path, tiny_data: Path, folder: Path, device: str) -> Any:
    extra = "[decision]\nmax_escape_rate = 0.2\n"
    path = tiny_recipe(folder, tiny_data, extra=extra)
    text = path.read_text().replace("[train]\n", f'[train]\ndevice = "{device}"\n', 1)
    path.write_text(text)
    shutil.copytree(tiny_build, folder / "out" / "tiny")
    return load_recipe(path)


def _after_training(recipe: Any, console: Console) -> dict[str, Any]:
    for stage in ("quantize", "novelty", "decision"):
        run_stage(stage, recipe, console)
    return json.loads((recipe.out_dir / "manifest.json").read_text())


def test_checks_run_on_the_cuda_provider_with_the_cpus_results(
    tiny_build: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = _after_training(
        _copy(tiny_build, tiny_data, tmp_path / "cpu", "cpu"), Console(quiet=True)
    )
    gpu = FakeGpu(monkeypatch)
    console = Console(record=True, width=200)
    on_gpu = _after_training(_copy(tiny_build, tiny_data, tmp_path / "gpu", "cuda:1"), console)

    assert "checks on onnxruntime CUDA (GPU 1)" in console.export_text()
    assert gpu.device_ids() == {"1"}
    # FP32, FP16 and int8_trt (Q/DQ as written) ran on the GPU; int8_cpu on the CPU, whose
    # fused integer kernels are what it ships with.
    for model in ("model.onnx", "model.fp16.onnx", "model.int8.trt.onnx"):
        assert gpu.providers_of(model) and all(p[0] == CUDA for p in gpu.providers_of(model))
    assert all(p == ["CPUExecutionProvider"] for p in gpu.providers_of("model.int8.cpu.onnx"))
    assert gpu.providers_of("augmented.onnx")[0][0] == CUDA  # calibration
    v = on_gpu["variants"]
    assert v["fp16"]["evaluated_with"].startswith("onnxruntime CUDA (GPU 1)")
    assert v["int8_trt"]["evaluated_with"].startswith("onnxruntime CUDA (GPU 1), Q/DQ")
    assert v["int8_cpu"]["evaluated_with"].startswith("onnxruntime CPU, optimized kernels")
    assert on_gpu["calibration"]["on"] == "onnxruntime CUDA (GPU 1)"
    assert on_gpu["novelty"]["evaluated_with"] == "onnxruntime CUDA (GPU 1)"
    artifacts = on_gpu["decision"]["artifacts"]
    assert artifacts["model.onnx"]["evaluated_with"] == "onnxruntime CUDA (GPU 1)"
    assert artifacts["model.int8.cpu.onnx"]["evaluated_with"] == "onnxruntime CPU"
    # The same verdicts and figures as the CPU run (the fake GPU computes as the CPU does).
    for name, got in v.items():
        want = cpu["variants"][name]
        for key in ("status", "accuracy", "answers_changed", "max_abs_logit_diff"):
            assert got[key] == want[key], (name, key)
    assert on_gpu["novelty"]["threshold"] == cpu["novelty"]["threshold"]
    assert on_gpu["decision"]["threshold"] == cpu["decision"]["threshold"]
    assert cpu["calibration"]["on"] == "onnxruntime CPU"


def test_bench_times_fp32_and_fp16_on_cuda_where_it_starts(
    tiny_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = read_manifest(tiny_build)
    here, skipped = targets(tiny_build, manifest)
    if provider_problem("cuda") is not None:
        assert ("model.onnx", "cuda") not in {(t.artifact, t.provider) for t in here}
        assert any(s["artifact"] == "model.fp16.onnx" for s in skipped)
    FakeGpu(monkeypatch)
    found, _ = targets(tiny_build, manifest)
    pairs = {(t.artifact, t.provider) for t in found}
    assert {("model.onnx", "cuda"), ("model.fp16.onnx", "cuda")} <= pairs
    assert ("model.int8.cpu.onnx", "cpu") in pairs


@pytest.mark.gpu
def test_checks_on_a_real_gpu_agree_with_the_cpu(tiny_build: Path) -> None:
    # The tolerances the build relies on when its checks run on the GPU: FP32 with TF32 off
    # within the export's parity tolerance of the CPU; FP16 and Q/DQ-as-written INT8 giving
    # the CPU's answer on at least 99% of images (both round differently per kernel).
    on = placement_for("auto")
    if on.provider != "cuda":
        pytest.skip(f"ONNX Runtime's CUDA provider does not start here: {provider_problem('cuda')}")
    manifest = read_manifest(tiny_build)
    spec = Preprocessing.from_dict(manifest.preprocessing)
    x = load_batch([s.path for s in read_split(tiny_build, "val", manifest.classes)], spec)
    fp32_cpu = open_onnx(tiny_build / "model.onnx").logits_in_batches(x, 8)
    fp32_gpu = open_onnx(tiny_build / "model.onnx", on=on).logits_in_batches(x, 8)
    assert np.abs(fp32_cpu - fp32_gpu).max() <= 1e-3
    for name, simulate in (("model.fp16.onnx", False), ("model.int8.trt.onnx", True)):
        if not (tiny_build / name).is_file():
            continue
        a = open_onnx(tiny_build / name, simulate_qdq=simulate).logits_in_batches(x, 8)
        b = open_onnx(tiny_build / name, simulate_qdq=simulate, on=on).logits_in_batches(x, 8)
        assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99, name


def test_exactly_one_onnx_runtime_build_is_asked_for_on_every_platform() -> None:
    # Both builds install the same `onnxruntime` folder: asking for both on one platform
    # would leave whichever came last, and uninstalling either would break the other.
    import tomllib

    from packaging.requirements import Requirement

    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    builds = [r for r in map(Requirement, deps) if r.name.startswith("onnxruntime")]
    for system, machine, want in (
        ("linux", "x86_64", "onnxruntime-gpu"),
        ("win32", "AMD64", "onnxruntime-gpu"),
        ("linux", "aarch64", "onnxruntime"),
        ("darwin", "arm64", "onnxruntime"),
        ("darwin", "x86_64", "onnxruntime"),
        ("win32", "ARM64", "onnxruntime"),
    ):
        env = {"sys_platform": system, "platform_machine": machine}
        assert [r.name for r in builds if r.marker is None or r.marker.evaluate(env)] == [want]
