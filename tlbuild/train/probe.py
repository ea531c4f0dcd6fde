"""Linear probe: the new head fitted on the frozen pretrained body's features, in seconds.

Used two ways: as the head's starting point before fine-tuning (`train.head_init = "probe"`,
LP-FT: Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features") and as the
"head only" accuracy `tlbuild run` prints next to the fine-tuned one. One forward pass over the
un-augmented training and validation images (about a third of an epoch's cost), then a
full-batch L-BFGS logistic regression on the pooled features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# L2 penalty on the head's weights (on the mean cross-entropy). Without one, separable
# features drive the logits towards infinity and fine-tuning then starts with no gradient.
L2 = 1e-3
MAX_ITER = 200


@dataclass
class ProbeResult:
    """The fitted head's accuracy and loss on the validation split."""

    val_accuracy: float
    val_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form for metrics.json."""
        return {
            "accuracy": self.val_accuracy,
            "loss": self.val_loss,
            "seconds": self.seconds,
            "source": "linear probe on the frozen pretrained body",
        }


def _features(
    model: nn.Module, loader: Any, device: torch.device, memory_format: torch.memory_format
) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
            feats.append(f.float().cpu())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def probe_supported(model: nn.Module) -> bool:
    """Whether the model's head is one Linear layer fed by `forward_head(pre_logits=True)`."""
    get = getattr(model, "get_classifier", None)
    return callable(get) and isinstance(get(), nn.Linear) and hasattr(model, "forward_head")


def fit_probe(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> ProbeResult:
    """Fit the classifier of `model` on frozen features (model left in eval mode, body intact)."""
    t0 = time.perf_counter()
    model.eval()
    x_train, y_train = _features(model, train_loader, device, memory_format)
    x_val, y_val = _features(model, val_loader, device, memory_format)
    head = model.get_classifier()  # type: ignore[operator]
    assert isinstance(head, nn.Linear), "check probe_supported() first"
    k = head.out_features
    w = torch.zeros(k, x_train.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    xt, xv = x_train.double(), x_val.double()
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=MAX_ITER, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xt @ w.T + b, y_train) + L2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        head.weight.copy_(w.detach().to(head.weight))
        head.bias.copy_(b.detach().to(head.bias))
        logits = xv @ w.T + b
        val_loss = float(nn.functional.cross_entropy(logits, y_val))
        val_acc = float((logits.argmax(1) == y_val).double().mean()) if len(y_val) else 0.0
    return ProbeResult(val_acc, val_loss, time.perf_counter() - t0)
