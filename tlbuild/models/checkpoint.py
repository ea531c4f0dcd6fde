"""The fine-tuned model file (model.pt): weights plus what is needed to rebuild and feed it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tlbuild import __version__
from tlbuild.data.preprocess import Preprocessing
from tlbuild.errors import UsageError
from tlbuild.fileio import atomic_path
from tlbuild.models.factory import cpu_state_dict


@dataclass
class TrainedModel:
    """A fine-tuned classifier and its metadata."""

    model: nn.Module
    backbone: str
    classes: list[str]
    preprocessing: Preprocessing
    weights_source: str
    dropout: float
    meta: dict[str, Any] = field(default_factory=dict)  # best epoch, ok_class, train recipe


def save_trained(path: Path, tm: TrainedModel) -> None:
    """Write model.pt atomically; tensors and plain data only, loadable with weights_only=True."""
    payload = {
        "format": "tlbuild.model/1",
        "tlbuild_version": __version__,
        "backbone": tm.backbone,
        "classes": list(tm.classes),
        "dropout": tm.dropout,
        "preprocessing": tm.preprocessing.to_dict(),
        "weights_source": tm.weights_source,
        "state_dict": cpu_state_dict(tm.model),
        "meta": tm.meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_trained(path: Path) -> TrainedModel:
    """Rebuild the model from model.pt (no network, no pretrained download)."""
    if not path.is_file():
        raise UsageError(f"no trained model at {path}; run `tlbuild train` first")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path}: not a readable tlbuild model file ({e})") from None
    if not isinstance(d, dict) or d.get("format") != "tlbuild.model/1":
        raise UsageError(f"{path}: not a tlbuild model file")
    try:
        model = timm.create_model(
            d["backbone"], pretrained=False, num_classes=len(d["classes"]), drop_rate=d["dropout"]
        )
        model.load_state_dict(d["state_dict"])
        model.eval()
        return TrainedModel(
            model=model,
            backbone=d["backbone"],
            classes=list(d["classes"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            weights_source=d["weights_source"],
            dropout=float(d["dropout"]),
            meta=dict(d.get("meta", {})),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # damaged, or another format
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise UsageError(f"{path}: a damaged tlbuild model file ({why})") from None
