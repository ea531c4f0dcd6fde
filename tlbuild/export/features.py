"""The features every exported model returns beside its logits, for the novelty score.

`features` is one row per image: the classifier's own input (the pooled pre-logits vector),
the input image's own statistics (exposure, contrast, focus), then, for each of up to
MAX_LEVELS of the backbone's feature maps (timm's `forward_intermediates`, input side first),
the per-channel spatial mean and standard deviation. The early maps keep what fine-tuning
teaches the classifier to ignore (brightness, contrast, focus, noise), which is what a failed
camera changes: on the demo model a Gaussian over the pre-logits alone scored a nearly black
frame at AUROC 0.82 against validation, the early maps' statistics at 1.00. The layout (block
names and widths) is recorded in the manifest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

# Enough levels to span input side to output side; a ViT's 12 equal blocks add little each.
MAX_LEVELS = 5


def _level_indices(n: int) -> list[int]:
    if n <= MAX_LEVELS:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, MAX_LEVELS)})


def _image_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per channel of the (normalised) input: mean, standard deviation, and the standard
    deviation of its fine detail (the image less its 3x3 local mean). Computed before any
    layer, so every precision variant sees them exactly: focus, exposure and contrast."""
    mean = x.mean(dim=(2, 3))
    std = torch.sqrt(((x - mean[:, :, None, None]) ** 2).mean(dim=(2, 3)) + 1e-12)
    local = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    detail = torch.sqrt(((x - local) ** 2).mean(dim=(2, 3)) + 1e-12)
    return torch.cat([mean, std, detail], dim=1)


class WithFeatures(nn.Module):
    """`model` returning (logits, features); the logits are the model's own, computed once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        final, maps = m.forward_intermediates(x)  # type: ignore[operator]
        pre = m.forward_head(final, pre_logits=True)  # type: ignore[operator]
        logits = m.get_classifier()(pre)  # type: ignore[operator]
        parts = [pre.flatten(1), _image_statistics(x)]
        for i in _level_indices(len(maps)):
            t = maps[i]
            mean = t.mean(dim=(2, 3))
            # Written out (not torch.std) so the exported graph is plain ReduceMean/Sub/Mul/Sqrt.
            var = ((t - mean[:, :, None, None]) ** 2).mean(dim=(2, 3))
            parts += [mean, torch.sqrt(var + 1e-12)]
        return logits, torch.cat(parts, dim=1)


def feature_layout(model: nn.Module, example: torch.Tensor) -> list[dict[str, Any]]:
    """Blocks of the features row, in order: {"name", "width"}."""
    with torch.inference_mode():
        final, maps = model.eval().forward_intermediates(example)  # type: ignore[operator]
        pre = model.forward_head(final, pre_logits=True)  # type: ignore[operator]
    blocks = [
        {"name": "pre_logits", "width": int(pre.flatten(1).shape[1])},
        {"name": "image", "width": 3 * int(example.shape[1])},
    ]
    for i in _level_indices(len(maps)):
        # Each channel's mean, then each channel's standard deviation.
        blocks.append({"name": f"level{i}", "width": 2 * int(maps[i].shape[1])})
    return blocks


def supports_features(model: nn.Module) -> bool:
    """Whether timm gives this model's feature maps (every timm backbone tried does)."""
    return hasattr(model, "forward_intermediates") and hasattr(model, "forward_head")
