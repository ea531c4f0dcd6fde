"""Grad-CAM (Selvaraju et al., 2017) on any timm CNN, on the last spatial feature map.

Self-contained rather than the `grad-cam` package (pytorch_grad_cam): the method is a dozen
lines, and that package pulls in OpenCV, scikit-learn and ttach, asks the caller to name the
target layer per architecture, and would have to be an optional extra, so the default build
would skip the report's heat maps. Here the target layer is found generically: timm splits
every model into `forward_features` (the body, ending in the last feature map before global
pooling) and `forward_head` (pooling, any head convs, the classifier). Grad-CAM's gradient is
d(class logit)/d(feature map), which only the head takes part in, so the body runs once without
autograd and only the small head is differentiated: a heat map costs about one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tlbuild.errors import UsageError


class NoFeatureMap(UsageError):
    """The backbone ends in tokens, not a spatial map (a vision transformer): no Grad-CAM."""


@dataclass
class Explained:
    """One batch: class probabilities (N, classes) and heat maps (N, h, w) scaled to 0..1."""

    probs: torch.Tensor
    cams: torch.Tensor  # at the feature map's resolution; `upsample` brings them to the input
    flat: torch.Tensor  # (N,) bool: no region stands out (often: no positive evidence at all)


def _spatial(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The feature map as NCHW, or a UsageError for models without one (transformers)."""
    if features.ndim == 4:
        # A few timm families (Swin, some hybrids) return NHWC and say so.
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features
    name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    raise NoFeatureMap(
        f"backbone '{name}' has no spatial feature map (its features have shape "
        f"{tuple(features.shape)}, tokens rather than a grid), so Grad-CAM heat maps are not "
        "available for it (they need a CNN backbone)"
    )


def grad_cam(
    model: nn.Module, batch: torch.Tensor, target: torch.Tensor | None = None
) -> Explained:
    """Probabilities and Grad-CAM maps of `batch` for `target` classes (default: the top class).

    The map is ReLU(sum_k a_k A_k) with a_k the spatial mean of d(logit)/d(A_k) over the last
    feature map A, normalised to 0..1 per image. `model` must be in eval mode.
    """
    with torch.no_grad():
        raw = model.forward_features(batch)  # type: ignore[operator]
    _spatial(model, raw)  # refuse token outputs before differentiating anything
    feats = raw.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(feats)  # type: ignore[operator]
        if target is None:
            target = logits.argmax(1)
        # Samples do not interact in eval mode, so the gradient of the summed target logits
        # gives every image its own; autograd.grad leaves the parameters' .grad untouched.
        (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    acts, grads = _spatial(model, feats.detach()), _spatial(model, grads)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * acts).sum(dim=1))
    span = cams.flatten(1).amax(1) - cams.flatten(1).amin(1)
    flat = span <= 1e-6 * cams.flatten(1).abs().amax(1).clamp_min(1e-6)
    return Explained(logits.detach().softmax(1), _unit_range(cams), flat)


def _unit_range(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map to 0..1 (min-max, as pytorch_grad_cam does); a flat map becomes 0."""
    flat = cams.flatten(1)
    lo = flat.min(1).values[:, None, None]
    span = (flat.max(1).values[:, None, None] - lo).clamp_min(1e-12)
    return (cams - lo) / span


def upsample(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Heat maps (N, h, w) resized to the input's (H, W), bilinear, staying within 0..1."""
    return F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
