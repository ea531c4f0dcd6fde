from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tlbuild.data.preprocess import preprocess
from tlbuild.errors import UsageError
from tlbuild.models.factory import body_groups, head_parameters, make_model
from tlbuild.recipe import ModelConfig, PhaseConfig
from tlbuild.train.phases import apply_phase, set_train_mode


def test_bundled_imagenet_weights_are_real() -> None:
    """The unmodified ImageNet model recognises a real photo: the weights are not random."""
    data = pytest.importorskip("skimage.data")
    # Whole photo resized to 224 (no centre crop), as the weights' reference check does.
    cfg = ModelConfig.model_validate({"preprocess": {"resize": "resize"}})
    built = make_model(cfg, num_classes=1000)
    assert built.weights_source.startswith("bundled:")
    model = built.model.eval()
    probs = []
    for photo, expected in ((data.chelsea(), 285), (data.coffee(), 967)):  # Egyptian cat, espresso
        x = torch.from_numpy(preprocess(Image.fromarray(photo), built.preprocessing))[None]
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        assert int(p.argmax()) == expected
        probs.append(float(p.max()))
    assert min(probs) > 0.5


def test_preprocessing_comes_from_the_backbone_and_recipe_overrides_it() -> None:
    built = make_model(ModelConfig(weights="none"), num_classes=3)
    pre = built.preprocessing
    assert pre.input_size == (224, 224) and pre.interpolation == "bicubic"
    assert pre.mean == (0.5, 0.5, 0.5) and pre.resize == "center_crop" and pre.crop_pct == 0.875
    cfg = ModelConfig.model_validate(
        {"weights": "none", "preprocess": {"input_size": [96, 128], "resize": "resize"}}
    )
    pre = make_model(cfg, num_classes=3).preprocessing
    assert pre.input_size == (96, 128) and pre.resize == "resize"
    img = Image.new("RGB", (300, 200), (128, 128, 128))
    assert preprocess(img, pre).shape == (3, 96, 128)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18", "efficientnet_b0"])
def test_other_timm_backbones_get_a_new_head(name: str) -> None:
    built = make_model(ModelConfig(backbone=name, weights="none", dropout=0.3), num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    assert built.model.eval()(x).shape == (2, 5)
    assert len(body_groups(built.model)) >= 4


def test_unknown_backbone_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a timm model.*tlbuild backbones"):
        make_model(ModelConfig(backbone="efficientnet_lite9000", weights="none"), 2)


def test_weights_file_by_name(tmp_path) -> None:
    src = make_model(ModelConfig(backbone="resnet18", weights="none"), num_classes=10).model
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    cfg = ModelConfig.model_validate({"backbone": "resnet18", "weights": str(path)})
    dst = make_model(cfg, num_classes=3).model
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert dst.fc.weight.shape == (3, 512)  # classifier of another class count: fresh head
    bad = ModelConfig.model_validate({"backbone": "mobilenetv2_100", "weights": str(path)})
    with pytest.raises(UsageError, match="w.pth"):
        make_model(bad, num_classes=3)


def test_frozen_phase_trains_only_the_head_and_freezes_bn_statistics() -> None:
    model = make_model(ModelConfig(weights="none"), num_classes=4).model
    groups = apply_phase(model, PhaseConfig(name="head", epochs=1, unfreeze=0), 1e-3)
    assert [g["name"] for g in groups] == ["head"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in head_parameters(model)}
    set_train_mode(model, PhaseConfig(name="head", epochs=1))
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, model.bn1.running_mean)  # statistics did not move


def test_unfreeze_top_groups_uses_discriminative_rates() -> None:
    model = make_model(ModelConfig(weights="none"), num_classes=4).model
    phase = PhaseConfig(name="ft", epochs=1, lr=1e-3, unfreeze=2, body_lr_mult=0.1)
    groups = apply_phase(model, phase, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    top2 = {id(p) for g in body_groups(model)[-2:] for p in g}
    assert {id(p) for p in groups[1]["params"]} == top2
    assert not any(p.requires_grad for p in body_groups(model)[0])
    set_train_mode(model, phase)
    assert model.bn2.training and not model.bn1.training
    all_groups = apply_phase(model, PhaseConfig(name="all", epochs=1, unfreeze="all"), 1e-3)
    n_body = sum(p.numel() for g in body_groups(model) for p in g)
    assert sum(p.numel() for p in all_groups[1]["params"]) == n_body
    assert np.isclose(all_groups[1]["lr"], 1e-4)
