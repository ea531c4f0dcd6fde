"""Grad-CAM heat maps: where the map points, every CNN backbone, the report's grids, the cap,
and `tlbuild explain`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tlbuild import runner
from tlbuild.cli import app
from tlbuild.explain.gradcam import NoFeatureMap, grad_cam, upsample
from tlbuild.explain.validation import choose
from tlbuild.recipe import ExplainConfig, ModelConfig, load_recipe

cli = CliRunner()
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    """The bundled Lite0 with its own ImageNet head: a network whose answers are known."""
    from tlbuild.models.factory import make_model

    return make_model(ModelConfig(), 1000).model.eval()


def _cat_in_each_corner() -> torch.Tensor:
    """Four 224 px images: a real photograph of a cat (scikit-image's chelsea) shrunk into one
    quadrant of a flat grey canvas, top-left, top-right, bottom-left, bottom-right."""
    import skimage.data

    cat = Image.fromarray(skimage.data.chelsea()).resize((112, 112), Image.Resampling.BICUBIC)
    batch = []
    for corner in range(4):
        canvas = Image.new("RGB", (224, 224), (128, 128, 128))
        canvas.paste(cat, ((corner % 2) * 112, (corner // 2) * 112))
        x = np.asarray(canvas, np.float32) / 255.0
        batch.append((x.transpose(2, 0, 1) - 0.5) / 0.5)  # Lite0's mean and std
    return torch.from_numpy(np.stack(batch))


def test_the_heat_map_covers_the_cat_wherever_it_is(imagenet_lite0: torch.nn.Module) -> None:
    ex = grad_cam(imagenet_lite0, _cat_in_each_corner())
    assert not ex.flat.any()
    # ImageNet's cat classes are 281-285 (tabby, tiger cat, Persian, Siamese, Egyptian cat).
    assert all(281 <= int(c) <= 285 for c in ex.probs.argmax(1))
    cams = upsample(ex.cams, (224, 224)).numpy()
    for corner, cam in enumerate(cams):
        quads = [cam[:112, :112], cam[:112, 112:], cam[112:, :112], cam[112:, 112:]]
        share = np.array([q.sum() for q in quads]) / cam.sum()
        assert share.argmax() == corner and share[corner] > 0.5, (corner, share.round(2))


def test_grad_cam_of_a_pooled_linear_head_is_the_class_activation_map(
    imagenet_lite0: torch.nn.Module,
) -> None:
    # Lite0's head is global average pooling then a linear layer, for which Grad-CAM reduces
    # to Zhou et al.'s CAM: ReLU(W_c . A), computed here straight from the weights.
    x = torch.nn.functional.interpolate(_cat_in_each_corner()[:2], size=96)  # any size will do
    ex = grad_cam(imagenet_lite0, x, target=torch.tensor([281, 282]))  # tabby, tiger cat
    with torch.no_grad():
        feats = imagenet_lite0.forward_features(x)
        w = imagenet_lite0.get_classifier().weight[[281, 282]]
        cam = torch.relu(torch.einsum("nc,nchw->nhw", w, feats))
    lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    cam = (cam - lo) / (hi - lo)
    assert not ex.flat.any()
    assert torch.allclose(ex.cams, cam, atol=1e-5)
    assert torch.allclose(ex.probs, imagenet_lite0(x).softmax(1), atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_050"])
def test_any_cnn_backbone_gets_a_map_from_its_last_feature_map(backbone: str) -> None:
    # Random weights: what is checked is the wiring (ResNet: pooled linear head; MobileNetV3:
    # a conv and an activation between the pooling and the classifier).
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    ex = grad_cam(model, x)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
    assert ex.cams.shape == (2, *feats.shape[2:])
    assert float(ex.cams.min()) >= 0.0 and float(ex.cams.max()) == pytest.approx(1.0)
    assert torch.allclose(ex.probs, model(x).softmax(1), atol=1e-5)


def test_a_channels_last_feature_map_gives_the_same_heat_map() -> None:
    class Nhwc(torch.nn.Module):  # what Swin-like timm models return, flagged by output_fmt
        output_fmt = "NHWC"

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.forward_features(x).permute(0, 2, 3, 1)

        def forward_head(self, f: torch.Tensor) -> torch.Tensor:
            return self.inner.forward_head(f.permute(0, 3, 1, 2))

    torch.manual_seed(0)
    inner = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(grad_cam(Nhwc(inner), x).cams, grad_cam(inner, x).cams, atol=1e-6)


def test_a_map_that_singles_out_nothing_is_flagged_flat() -> None:
    class Uniform(torch.nn.Module):  # the same features at every position: no region to show
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))[:, None, None, None].expand(-1, 4, 3, 3) + 1.0

        def forward_head(self, f: torch.Tensor) -> torch.Tensor:
            return self.fc(f.mean(dim=(2, 3)))

    ex = grad_cam(Uniform().eval(), torch.rand(2, 3, 8, 8))
    assert ex.flat.all() and float(ex.cams.abs().max()) == 0.0


def test_a_transformer_backbone_is_refused_with_the_reason() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32
    ).eval()
    with pytest.raises(NoFeatureMap, match="no spatial feature map.*need a CNN backbone"):
        grad_cam(model, torch.randn(1, 3, 32, 32))


def test_choose_reserves_correct_ones_and_shows_the_surest_mistakes_first() -> None:
    true = np.zeros(15, np.int64)
    probs = np.tile([0.9, 0.1], (15, 1))  # 10 correct ...
    wrong_conf = [0.6, 0.95, 0.7, 0.8, 0.55]  # ... and 5 predicted class 1, this sure
    for i, p in enumerate(wrong_conf):
        probs[10 + i] = [1 - p, p]
    c = choose(true, probs, 0, ExplainConfig(max_images=4, correct_per_class=1))
    assert c.misclassified == [11, 13, 12] and len(c.correct) == 1 and c.correct[0] < 10
    assert c.total_misclassified == 5 and c.images == 15
    again = choose(true, probs, 0, ExplainConfig(max_images=4, correct_per_class=1))
    assert again.correct == c.correct  # seeded: every build shows the same ones
    c = choose(true, probs, 0, ExplainConfig(max_images=2, correct_per_class=4))
    assert len(c.correct) == 2 and c.misclassified == []
    c = choose(true, probs, 1, ExplainConfig())  # no image of class 1: nothing to show
    assert c.images == 0 and c.misclassified == c.correct == []


def _mistakes_per_class(out: Path) -> dict[str, int]:
    """Misclassified validation images per true class, from training's own metrics.json."""
    cm = json.loads((out / "metrics.json").read_text())["val"]["confusion_matrix"]
    rows = cm["rows_true_cols_pred"]
    return {c: sum(r) - r[i] for i, (c, r) in enumerate(zip(cm["labels"], rows, strict=True))}


def test_the_report_has_a_heat_map_grid_per_class(tiny_build: Path) -> None:
    report = (tiny_build / "report.md").read_text()
    data = json.loads((tiny_build / "heatmaps.json").read_text())
    mistakes = _mistakes_per_class(tiny_build)
    assert "## Heat maps (Grad-CAM)" in report
    for c in data["classes"]:
        assert c["images"] == 2  # the tiny set: 8 images a class, a quarter for validation
        assert c["misclassified"] == mistakes[c["class"]]
        shown = f"{c['misclassified_shown']} of {c['misclassified']} misclassified shown"
        if not c["misclassified"]:
            shown = f"none misclassified; {c['correct_shown']} correct shown"
        assert f"| {c['class']} | 2 | {c['misclassified']} | {shown}" in report
        assert c["misclassified_shown"] == min(c["misclassified"], 16 - c["correct_shown"])
        png = tiny_build / c["png"]
        assert f"]({c['png']})" in report
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 200
        titles = [t["title"] for t in c["tiles"]]
        assert len(titles) == c["misclassified_shown"] + c["correct_shown"]
        pattern = rf"true: {c['class']} / pred: \w+ [01]\.\d\d( / flat map)?"
        assert all(re.fullmatch(pattern, t) for t in titles)
        # Misclassified first.
        wrong = [t["wrong"] for t in c["tiles"]]
        assert wrong == sorted(wrong, reverse=True)


def test_the_cap_is_kept_and_stated_and_only_explain_and_report_rerun(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe(
        tmp_path, tiny_data, extra="[explain]\nmax_images = 1\ncorrect_per_class = 0"
    )
    out = tmp_path / "out" / "tiny"
    shutil.copytree(tiny_build, out)
    ran = {s.stage: s.action for s in runner.run(load_recipe(recipe), QUIET).stages}
    assert {s for s, a in ran.items() if a == "ran"} == {"explain", "report"}
    data = json.loads((out / "heatmaps.json").read_text())
    report = (out / "report.md").read_text()
    assert "at most 1 validation images" in report
    for c in data["classes"]:
        shown = min(1, c["misclassified"])
        assert c["misclassified_shown"] == shown and c["correct_shown"] == 0
        assert len(c["tiles"]) == shown
        line = f"{shown} of {c['misclassified']} misclassified shown, 0 correct"
        if not c["misclassified"]:
            line = "none misclassified; 0 correct shown"
        assert f"| {c['class']} | 2 | {c['misclassified']} | {line} |" in report
    assert len(list(out.glob("heatmaps_*.png"))) == sum(bool(c["tiles"]) for c in data["classes"])

    # Heat maps depend on training alone: a new benchmark leaves them fresh.
    recipe.write_text(recipe.read_text().replace("min_iters = 5", "min_iters = 6"))
    status = {r.stage: r.action for r in runner.stage_status(load_recipe(recipe))}
    assert status["bench"] == "stale" and status["explain"] == "fresh"

    recipe.write_text(recipe.read_text().replace("max_images = 1", "max_images = 0"))
    ran = {s.stage: s.action for s in runner.run(load_recipe(recipe), QUIET).stages}
    assert ran["explain"] == "disabled" and ran["report"] == "ran"
    assert not list(out.glob("heatmaps*"))
    assert "## Heat maps" not in (out / "report.md").read_text()


def _images(tiny_data: Path, folder: Path) -> Path:
    folder.mkdir()
    for cls in ("crack", "ok"):
        shutil.copy(next((tiny_data / cls).glob("*.jpg")), folder / f"{cls}.jpg")
    (folder / "torn.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    return folder


def test_explain_writes_an_overlay_and_a_parquet_row_per_image(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    images = _images(tiny_data, tmp_path / "in")
    out = tmp_path / "maps"
    res = cli.invoke(app, ["explain", str(images), "--model", str(tiny_build), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 of 3 image(s) explained" in res.output and "torn.jpg" in res.output
    rows = pd.read_parquet(out / "heatmaps.parquet")
    assert sorted(Path(p).name for p in rows["path"]) == ["crack.jpg", "ok.jpg", "torn.jpg"]
    classes = json.loads((tiny_build / "labels.json").read_text())
    good = rows[rows["error"].isna()]
    assert len(good) == 2 and set(good["label"]) <= set(classes)
    for _, r in good.iterrows():
        top = json.loads(r["topk_labels"])
        assert top[0] == r["label"] and len(top) == 3
        assert json.loads(r["topk_scores"])[0] == pytest.approx(r["score"], abs=1e-6)
        with Image.open(out / r["heatmap"]) as im:
            assert im.format == "PNG"
    bad = rows[rows["error"].notna()].iloc[0]
    assert Path(bad["path"]).name == "torn.jpg" and pd.isna(bad["label"])
    assert pd.isna(bad["heatmap"]) and "cannot decode" in bad["error"]
    assert not (out / "grid.png").exists()

    capped = tmp_path / "capped"
    args = ["explain", str(images / "ok.jpg"), str(images / "crack.jpg"), "--model"]
    res = cli.invoke(app, [*args, str(tiny_build), "--out", str(capped), "--max-images", "1"])
    assert res.exit_code == 0 and "1 of 2 image(s) explained (the first 1" in res.output
    assert len(pd.read_parquet(capped / "heatmaps.parquet")) == 1
    res = cli.invoke(app, [*args, str(tiny_build), "--out", str(capped), "--grid"])
    assert res.exit_code == 0 and (capped / "grid.png").stat().st_size > 1000


def test_explain_bad_inputs_give_one_message(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    images = _images(tiny_data, tmp_path / "in")
    device_copy = tmp_path / "device"
    device_copy.mkdir()
    for name in ("model.onnx", "manifest.json", "labels.json"):
        shutil.copy(tiny_build / name, device_copy / name)
    cases = [
        (["--model", str(device_copy)], "has no model.pt: heat maps need the PyTorch model"),
        (["--model", str(tmp_path / "nowhere")], "no such export folder"),
    ]
    for extra, message in cases:
        res = cli.invoke(app, ["explain", str(images), *extra])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    res = cli.invoke(app, ["explain", str(images / "gone.jpg"), "--model", str(tiny_build)])
    assert res.exit_code == 2 and "input not found" in res.output and "gone.jpg" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli.invoke(app, ["explain", str(empty), "--model", str(tiny_build)])
    assert res.exit_code == 2 and "no image files" in res.output
