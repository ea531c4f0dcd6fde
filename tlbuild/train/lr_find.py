"""Learning-rate range test (Smith 2017; fastai's `lr_find`) for phases with `lr = "auto"`.

The rate grows exponentially from `START` to `END` over a bounded number of optimizer steps on
the phase's own parameter groups (body/head ratio kept); the smoothed training loss is recorded
until it diverges. The model, its BatchNorm statistics, the CPU and CUDA random generators and
the loader's generator are restored afterwards (the caller restores its AMP loss scale), so the
test changes nothing but the chosen rate.

Rule (fastai's "valley", its default since 2.5): take the longest run of steps over which the
smoothed loss keeps falling, and choose the rate two thirds of the way into its first half
(index start + len/3 + len/6): far enough down the slope to learn fast, well before the minimum,
where the loss is about to blow up.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

START, END = 1e-6, 1.0
SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


@dataclass(frozen=True)
class RangeTest:
    """One range test: the phase it chooses a rate for, its optimizer steps, its seed."""

    phase: str
    steps: int
    seed: int


@dataclass
class LrFindResult:
    """The curve and the chosen head learning rate of one phase."""

    phase: str
    lrs: list[float]
    losses: list[float]
    chosen: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form (history and manifest; the phase under its older key, "stage")."""
        return {
            "stage": self.phase,
            "chosen": self.chosen,
            "steps": self.steps,
            "rule": "valley",
            "lrs": self.lrs,
            "losses": self.losses,
        }


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's valley rule over a smoothed loss curve (see the module docstring)."""
    n = len(losses)
    if n < 3:
        return lrs[0]
    # Longest strictly decreasing subsequence ending at each index (O(n^2); n <= a few hundred).
    run = [1] * n
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[best_end]:
            best_end = i
    start = best_end - run[best_end] + 1
    third = (best_end - start) / 3
    return lrs[min(n - 1, start + int(third) + int(third / 2))]


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def lr_range_test(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    loader: Any,
    step_fn: Callable[[torch.optim.Optimizer, Any], float],
    test: RangeTest,
) -> LrFindResult:
    """Run the range test and restore everything it touched; return the curve and the rate.

    `step_fn(optimizer, batch)` does one training step and returns its (unsmoothed) loss.
    """
    steps, seed = test.steps, test.seed
    saved_model = copy.deepcopy(model.state_dict())
    ratios = [g["lr"] / param_groups[0]["lr"] for g in param_groups]
    groups = [{**g, "lr": START * r} for g, r in zip(param_groups, ratios, strict=True)]
    optimizer = make_optimizer(groups)
    gamma = (END / START) ** (1 / max(1, steps - 1))
    gen = getattr(loader, "generator", None)
    saved_gen = gen.get_state() if gen is not None else None
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    # fork_rng puts the CPU and CUDA generators back afterwards; the seed makes the test repeat.
    # Only the model's GPUs: touching every GPU's generator would make each torchrun process
    # open a CUDA context on every GPU of the node.
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        if gen is not None:
            gen.manual_seed(seed)
        try:
            batches = _cycle(loader)
            for i in range(steps):
                lr = START * gamma**i
                for g, r in zip(optimizer.param_groups, ratios, strict=True):
                    g["lr"] = lr * r
                loss = step_fn(optimizer, next(batches))
                if not math.isfinite(loss):
                    break
                avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
                smoothed = avg / (1 - SMOOTHING ** (i + 1))
                lrs.append(lr)
                losses.append(smoothed)
                best = min(best, smoothed)
                if i > 5 and smoothed > DIVERGED * best:
                    break
        finally:
            model.load_state_dict(saved_model)
            if gen is not None and saved_gen is not None:
                gen.set_state(saved_gen)
    # The caller refuses a curve this short; START is only a placeholder then.
    chosen = valley(lrs, losses) if len(lrs) >= 3 else START
    return LrFindResult(test.phase, lrs, losses, float(chosen), len(lrs))


def plot_lr_find(results: list[dict[str, Any]], path: Path) -> None:
    """Loss against learning rate per phase (LrFindResult.to_dict form), the chosen rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tlbuild.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in results:
        (line,) = ax.plot(r["lrs"], r["losses"], label=f"{r['stage']}: chosen {r['chosen']:.2g}")
        ax.axvline(r["chosen"], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("head learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Learning-rate range test")
    curves = [r["losses"] for r in results if r["losses"]]
    if curves:
        lo = min(min(c) for c in curves)
        first = max(c[0] for c in curves)
        ax.set_ylim(lo * 0.9, max(first, lo) * 1.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
