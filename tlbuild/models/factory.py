"""Backbone factory over timm: new head, pretrained weights, preprocessing, layer groups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.sizes import SizeSummary, resolve_input_size
from tlbuild.errors import UsageError
from tlbuild.models.weights import (
    bundled_weights_path,
    load_by_name,
    load_in_order,
    read_state_file,
)
from tlbuild.recipe import ModelConfig, PreprocessConfig

# The seed architectures users ask for; `tlbuild backbones --all` lists every timm model.
RECOMMENDED = (
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "resnet50",
    "inception_v3",
    "vgg16",
)


@dataclass
class NewClassifier:
    """A classifier ready to fine-tune, with everything needed to feed it."""

    model: nn.Module
    preprocessing: Preprocessing
    weights_source: str


def check_backbone(backbone: str) -> None:
    """A UsageError naming similar models if `backbone` is not a timm model."""
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise UsageError(
            f"model.backbone = '{backbone}' is not a timm model.{hint} "
            "`tlbuild backbones --all` lists them."
        )


def resolve_preprocessing(
    model: nn.Module, overrides: PreprocessConfig, images: SizeSummary | None = None
) -> Preprocessing:
    """The backbone's timm preprocessing with the recipe's overrides applied.

    `images` (the training images' sizes) resolves `input_size = "auto"`.
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    size = resolve_input_size(overrides.input_size, images, tuple(cfg["input_size"][1:]))
    interp = overrides.interpolation or cfg.get("interpolation", "bilinear")
    if interp not in ("nearest", "bilinear", "bicubic", "lanczos"):
        interp = "bicubic"
    return Preprocessing(
        input_size=size,
        interpolation=interp,
        mean=tuple(float(m) for m in (overrides.mean or cfg["mean"])),  # type: ignore[arg-type]
        std=tuple(float(s) for s in (overrides.std or cfg["std"])),  # type: ignore[arg-type]
        resize=overrides.resize or "center_crop",
        crop_pct=float(overrides.crop_pct or cfg.get("crop_pct", 0.875)),
    )


def _hub_pretrained(cfg: ModelConfig, num_classes: int) -> nn.Module:
    try:
        return timm.create_model(
            cfg.backbone, pretrained=True, num_classes=num_classes, drop_rate=cfg.dropout
        )
    except Exception as e:  # network, missing cache, no pretrained tag: all the same to a user
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UsageError(
            f"no offline ImageNet weights for '{cfg.backbone}' and the hub download failed "
            f"({type(e).__name__}{', HF_HUB_OFFLINE=1' if offline else ''}). Either set "
            'model.weights to a local .pth/.safetensors file, use weights = "none", run once '
            "online to fill timm's cache, or pick a backbone `tlbuild backbones` marks offline."
        ) from None


def make_model(
    cfg: ModelConfig, num_classes: int, images: SizeSummary | None = None
) -> NewClassifier:
    """Create `cfg.backbone` with a new head (global pool, dropout, linear) and its weights.

    `images` (the training images' sizes) resolves `input_size = "auto"`.
    """
    check_backbone(cfg.backbone)
    bundled = bundled_weights_path(cfg.backbone) if cfg.weights == "imagenet" else None
    if cfg.weights == "imagenet" and bundled is None:
        model = _hub_pretrained(cfg, num_classes)
        source = f"timm hub: {model.pretrained_cfg.get('hf_hub_id') or cfg.backbone}"
    else:
        model = timm.create_model(
            cfg.backbone, pretrained=False, num_classes=num_classes, drop_rate=cfg.dropout
        )
        if bundled is not None:
            load_in_order(model, read_state_file(bundled), str(bundled))
            source = f"bundled: {bundled.parent.parent.name}/{bundled.name}"
        elif cfg.weights == "none":
            source = "none (random init)"
        else:
            path = Path(cfg.weights)
            state = read_state_file(path)
            try:
                load_by_name(model, state, str(path))
            except UsageError:
                # Checkpoints from other codebases (e.g. the lukemelas EfficientNet) use other
                # names in the same order; fall back to positional loading, shape-checked.
                load_in_order(model, state, str(path))
            source = f"file: {path}"
    if num_classes != 1000 or cfg.weights == "none":  # a new head, not ImageNet's own
        _init_head(model)
    return NewClassifier(model, resolve_preprocessing(model, cfg.preprocess, images), source)


def _init_head(model: nn.Module) -> None:
    # timm's EfficientNet init draws the classifier from U(-1/sqrt(classes), ..): for 4 classes
    # over 1280 ReLU6 features that gives logits in the tens and a first epoch spent undoing
    # it. A small normal init (as in BiT/ViT fine-tuning) starts from near-uniform outputs.
    for m in model.get_classifier().modules():  # type: ignore[operator]
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the new classifier."""
    return list(model.get_classifier().parameters())  # type: ignore[operator]


def body_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Body parameters in timm's coarse layer groups, input side first, head excluded."""
    head = {id(p) for p in head_parameters(model)}
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))  # type: ignore[operator]
    out: list[list[nn.Parameter]] = []
    for _, names in sorted(groups.items()):
        params = [named[n] for n in names if id(named[n]) not in head]
        if params:
            out.append(params)
    return out


def offline_weights(backbone: str) -> str | None:
    """Where offline ImageNet weights for `backbone` would come from, or None."""
    if bundled_weights_path(backbone) is not None:
        return "bundled"
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(backbone)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if hub_id:
            for fname in ("model.safetensors", "pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(hub_id, fname), str):
                    return "hub cache"
    except Exception:  # an unusual hub layout only means "not known to be offline"
        return None
    return None


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict (safe to keep while training continues)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
