from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tlbuild.errors import UsageError
from tlbuild.fileio import sha256_file
from tlbuild.runtime import load_predictor


def _val_paths(build: Path) -> list[Path]:
    return [Path(p) for p, _ in json.loads((build / "splits.json").read_text())["val"]]


def test_every_artifact_gives_the_same_answers_through_one_interface(tiny_build: Path) -> None:
    paths = _val_paths(tiny_build)
    ref = load_predictor(tiny_build / "model.pt").predict_paths(paths, batch_size=3)
    assert ref.shape == (8, 4) and np.allclose(ref.sum(1), 1, atol=1e-5)
    for name, atol in (
        ("model.onnx", 1e-4),
        ("model.fp16.onnx", 2e-2),
        ("model.int8.cpu.onnx", 0.2),
    ):
        p = load_predictor(tiny_build, artifact=name)
        assert p.backend == "onnxruntime:CPUExecutionProvider" and p.classes == [
            "crack",
            "ok",
            "scratch",
            "spot",
        ]
        got = p.predict_paths(paths)
        assert np.abs(got - ref).max() < atol, name


def test_folder_picks_the_best_accepted_cpu_artifact(tiny_build: Path) -> None:
    p = load_predictor(tiny_build)
    assert p.artifact.name == "model.int8.cpu.onnx" and p.precision == "int8"


def test_a_tampered_artifact_or_missing_provider_is_refused(
    tiny_build: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    with (copy / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UsageError, match="does not match the sha256"):
        load_predictor(copy / "model.onnx")
    with pytest.raises(
        UsageError,
        match="not available in this onnxruntime build|TensorrtExecutionProvider did not start",
    ):
        load_predictor(tiny_build, artifact="model.onnx", provider="tensorrt")
    with pytest.raises(UsageError, match="no manifest.json"):
        load_predictor(tmp_path)


def test_engines_are_accepted_or_refused_by_their_own_gate() -> None:
    from tlbuild.manifest import Manifest

    scores = dict(accuracy=0.5, fp32_accuracy=0.9, drop_points=40.0, top1_agreement=0.5)
    rejected = {
        "variant": "int8_cpu",
        "file": "model.int8.cpu.onnx",
        "precision": "int8",
        **scores,
        "max_abs_logit_diff": 3.0,
        "evaluated_with": "onnxruntime CPU",
        "status": "rejected",
    }
    manifest = Manifest.model_validate(
        {
            "variants": {"int8_cpu": rejected},
            "engines": {
                "status": "built",
                "engines": {
                    "fp16": {"path": "model.fp16.b1-32.sm89.trt10.8.engine", "status": "accepted"},
                    "int8_trt": {
                        "path": "model.int8-trt.b1-32.sm89.trt10.8.engine",
                        "status": "rejected",
                    },
                },
            },
        }
    )
    assert manifest.accepted("model.fp16.b1-32.sm89.trt10.8.engine")
    assert not manifest.accepted("model.int8-trt.b1-32.sm89.trt10.8.engine")
    assert not manifest.accepted("model.int8.cpu.onnx") and manifest.accepted("model.onnx")


def test_auto_takes_the_fastest_artifact_that_starts_here(tiny_build: Path, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(tiny_build, folder)
    # An accepted engine for some GPU: without TensorRT here it cannot start, so auto moves on.
    manifest = json.loads((folder / "manifest.json").read_text())
    engine = "model.int8-trt.b1-32.sm87.trt10.3.engine"
    (folder / engine).write_bytes(b"not for this machine")
    manifest["engines"] = {
        "status": "built",
        "engines": {"int8_trt": {"path": engine, "status": "accepted"}},
    }
    manifest["artifacts"][engine] = {"sha256": sha256_file(folder / engine), "bytes": 20}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    p = load_predictor(folder, provider="auto")
    assert p.artifact.name == "model.int8.cpu.onnx" and p.backend.endswith("CPUExecutionProvider")
    with pytest.raises(UsageError, match="no artifact in .* runs here: .*engine on tensorrt"):
        load_predictor(folder, artifact=engine, provider="auto")


def test_engine_batches_outside_the_profile_are_split_or_padded() -> None:
    from tlbuild.runtime.backends import TensorRTPredictor

    class Core:  # stands in for TensorRTEngine: profile 2..4, logits = row sums
        min_batch, max_batch = 2, 4
        output_name = "logits"
        calls: list[int] = []

        def run_all(self, x: np.ndarray) -> dict[str, np.ndarray]:
            assert 2 <= len(x) <= 4
            self.calls.append(len(x))
            sums = x.reshape(len(x), -1).sum(1, keepdims=True)
            return {"logits": sums, "features": -sums}

    p = TensorRTPredictor.__new__(TensorRTPredictor)
    p._core = Core()
    x = np.arange(9, dtype=np.float32).reshape(9, 1, 1, 1)
    assert p.logits(x).ravel().tolist() == list(range(9))
    assert Core.calls == [4, 4, 2] and p.supports_batch(3) and not p.supports_batch(8)
    # The features output is split and trimmed with the logits, row for row.
    logits, features = p.logits_and_features(x[:3])
    assert logits.ravel().tolist() == [0, 1, 2] and features.ravel().tolist() == [0, -1, -2]


def test_tensorrt_provider_gets_caches_profiles_and_int8_only_for_qdq(
    tiny_build: Path, tmp_path: Path
) -> None:
    import shutil

    from tlbuild.runtime.sessions import tensorrt_options

    folder = tmp_path / "m"
    shutil.copytree(tiny_build, folder)
    fp32 = tensorrt_options(folder / "model.onnx")
    assert fp32["trt_engine_cache_enable"] == "True" and fp32["trt_timing_cache_enable"] == "True"
    assert Path(fp32["trt_engine_cache_path"]).is_dir()
    assert fp32["trt_profile_min_shapes"] == "input:1x3x64x64"
    assert fp32["trt_profile_max_shapes"] == "input:64x3x64x64"
    assert fp32["trt_int8_enable"] == "False" and fp32["trt_fp16_enable"] == "False"
    int8 = tensorrt_options(folder / "model.int8.trt.onnx")
    assert int8["trt_int8_enable"] == "True" and int8["trt_fp16_enable"] == "True"
    # One cache per model file and library versions: a re-export never reuses an old engine.
    assert int8["trt_engine_cache_path"] != fp32["trt_engine_cache_path"]
    # What the manifest knows (input, sha256) gives the same options without a second load.
    man = json.loads((folder / "manifest.json").read_text())
    first = man["onnx"]["inputs"][0]
    known = tensorrt_options(
        folder / "model.onnx",
        (first["name"], first["shape"]),
        man["artifacts"]["model.onnx"]["sha256"],
    )
    assert known == fp32
