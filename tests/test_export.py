from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from rich.console import Console

from tlbuild import runner
from tlbuild.errors import BuildError
from tlbuild.fileio import sha256_file
from tlbuild.models.checkpoint import load_trained
from tlbuild.recipe import ExportConfig, load_recipe


def test_onnx_is_one_file_with_dynamic_batch_and_named_io(tiny_build: Path) -> None:
    path = tiny_build / "model.onnx"
    assert not list(tiny_build.glob("*.data")) and not list(tiny_build.glob(".*tmp*"))
    m = onnx.load(str(path))
    (inp,), (out, features) = m.graph.input, m.graph.output
    assert inp.name == "input" and out.name == "logits" and features.name == "features"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch",
        3,
        64,
        64,
    ]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    width = sum(
        b["width"]
        for b in json.loads((tiny_build / "manifest.json").read_text())["onnx"]["features"][
            "layout"
        ]
    )
    for n in (1, 5):
        logits, feats = sess.run(None, {"input": np.zeros((n, 3, 64, 64), np.float32)})
        assert logits.shape == (n, 4) and feats.shape == (n, width)


def test_manifest_records_preprocessing_io_parity_and_hashes(tiny_build: Path) -> None:
    man = json.loads((tiny_build / "manifest.json").read_text())
    assert man["classes"] == ["crack", "ok", "scratch", "spot"]
    assert json.loads((tiny_build / "labels.json").read_text()) == man["classes"]
    pre = man["preprocessing"]
    assert (
        pre["input_size"] == [64, 64]
        and pre["mean"] == [0.5, 0.5, 0.5]
        and pre["resize"] == "resize"
    )
    assert man["model"]["backbone"] == "tf_efficientnet_lite0"
    assert man["model"]["weights_source"].startswith("bundled:")
    assert man["onnx"]["opset"] == 18 and man["onnx"]["inputs"][0]["dtype"] == "float32"
    parity = man["onnx"]["parity"]
    assert parity["passed"] and parity["images"] == 8 and parity["max_abs_logit_diff"] < 1e-3
    for name in ("model.onnx", "model.pt", "labels.json", "metrics.json"):
        assert man["artifacts"][name]["sha256"] == sha256_file(tiny_build / name)
    assert set(man["versions"]) >= {"tlbuild", "torch", "onnx", "onnxruntime"}


def test_onnx_matches_pytorch_on_real_images(tiny_build: Path) -> None:
    import torch

    from tlbuild.data.preprocess import load_batch

    tm = load_trained(tiny_build / "model.pt")
    split = json.loads((tiny_build / "splits.json").read_text())
    x = load_batch([Path(p) for p, _ in split["val"]], tm.preprocessing)
    with torch.no_grad():
        ref = tm.model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(tiny_build / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    assert np.abs(ref - got).max() < 1e-3
    assert (ref.argmax(1) == got.argmax(1)).all()


def test_parity_failure_fails_the_build_and_leaves_no_onnx(
    tiny_build: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_build, out)
    (out / "model.onnx").unlink()
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    strict = recipe.model_copy(
        update={"output_dir": tmp_path, "name": "copy", "export": ExportConfig(parity_atol=1e-12)}
    )
    with pytest.raises(BuildError, match=r"disagrees with PyTorch on 8 validation images"):
        runner.run_one(strict, Console(quiet=True), "export")
    # The variants of the previous model.onnx go too: never beside a different model.
    assert sorted(p.name for p in out.glob("*.onnx*")) == []
    assert not (out / ".aside").exists()


def test_device_images_zero_ships_no_batch(tiny_build: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "nobatch"
    shutil.copytree(tiny_build, out)
    recipe = load_recipe(tiny_build.parent.parent / "tiny.toml")
    export = ExportConfig(parity_images=8, device_images=0)
    recipe = recipe.model_copy(update={"output_dir": tmp_path, "name": "nobatch", "export": export})
    runner.run_one(recipe, Console(quiet=True), "export")
    man = json.loads((out / "manifest.json").read_text())
    assert "device_batch" not in man and not (out / "device_batch.npz").exists()
