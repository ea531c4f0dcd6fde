"""The per-epoch training checkpoint: where training stands, its file, and `--resume` from it."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Splits
from tlbuild.errors import UsageError
from tlbuild.fileio import atomic_path
from tlbuild.models.factory import cpu_state_dict
from tlbuild.recipe import DataConfig, EarlyStoppingConfig, TrainConfig
from tlbuild.train import distributed
from tlbuild.train.distributed import Dist
from tlbuild.train.events import TrainEvents

# The checkpoint keys of the fields named for phases: they were written before fine-tuning's
# steps were called phases, and keep that name so checkpoints resume across the rename.
_SAVED_AS = {
    "phase": "stage",
    "epoch_in_phase": "epoch_in_stage",
    "phase_best": "stage_best",
    "phase_done": "stage_done",
    "phase_lr": "stage_lr",
}


@dataclass
class Best:
    """The best candidate so far: its val loss, its epoch (-1: the linear probe), its weights."""

    val_loss: float = math.inf
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None


@dataclass
class TrainState:
    """Where training stands: everything `--resume` needs besides the model's own weights.

    Every field is plain data or tensors, so `to_checkpoint` gives a dict that
    `torch.load(..., weights_only=True)` reads back; `from_checkpoint` rebuilds the state.
    """

    phase: int = 0
    epoch_in_phase: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    phase_best: float = math.inf
    bad_epochs: int = 0
    phase_done: bool = False
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None  # linear-probe result (ProbeResult.to_dict)
    phase_lr: dict[str, float] = field(default_factory=dict)  # phase name -> its head lr
    lr_find: list[dict[str, Any]] = field(default_factory=list)  # curves of lr = "auto" phases

    def to_checkpoint(self) -> dict[str, Any]:
        """The state as a dict of plain data and tensors (the checkpoint's keys)."""
        payload = {_SAVED_AS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        payload["best"] = {
            "val_loss": self.best.val_loss,
            "epoch": self.best.epoch,
            "state": self.best.state,
        }
        return payload

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """Rebuild from `to_checkpoint`'s dict; KeyError or TypeError when it is not one."""
        best = saved["best"]
        state = cls(
            **{
                f.name: saved[_SAVED_AS.get(f.name, f.name)]
                for f in fields(cls)
                if f.name != "best"
            }
        )
        state.best = Best(float(best["val_loss"]), int(best["epoch"]), best["state"])
        return state

    def enter_phase(self, pi: int) -> None:
        """Start phase `pi` afresh: its epochs, early stopping and optimizer, not the history."""
        self.phase, self.epoch_in_phase = pi, 0
        self.phase_best, self.bad_epochs, self.phase_done = math.inf, 0, False
        self.optimizer = self.scheduler = None

    def record_epoch(
        self, row: dict[str, Any], model: nn.Module, stopping: EarlyStoppingConfig
    ) -> bool:
        """Add an epoch's history row and update best and early stopping; True when best."""
        self.history.append(row)
        val_loss = row["val_loss"]
        is_best = val_loss < self.best.val_loss
        if is_best:
            self.best = Best(val_loss, row["epoch"], cpu_state_dict(model))
        if val_loss < self.phase_best - stopping.min_delta:
            self.phase_best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        self.phase_done = self.bad_epochs >= stopping.patience
        return is_best


def training_fingerprint(
    splits: Splits, cfg: TrainConfig, data: DataConfig, spec: Preprocessing, model_key: str
) -> str:
    """What a checkpoint was written for: recipe, data, split, preprocessing and model."""
    payload = {
        "train": cfg.stable_json(),
        # Neither changes the weights: worker count, or where decoded images are kept.
        "data": json.loads(data.model_dump_json(exclude={"workers", "cache_ram_mib"})),
        "classes": splits.classes,
        "train_files": [str(s.path) for s in splits.train],
        "val_files": [str(s.path) for s in splits.val],
        "pre": spec.to_dict(),
        "model": model_key,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_checkpoint(path: Path, model: nn.Module, state: TrainState, fingerprint: str) -> None:
    """Write everything needed to resume after this epoch, atomically.

    Only tensors and plain Python data, so resuming loads it with `weights_only=True`.
    """
    payload = state.to_checkpoint()
    payload["model"] = cpu_state_dict(model)
    payload["fingerprint"] = fingerprint
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _unresumable(path: Path) -> UsageError:
    return UsageError(
        f"--resume: {path} cannot be read as a training checkpoint (damaged, or written by "
        "another tlbuild version); run without --resume to start over"
    )


def read_checkpoint(path: Path, fingerprint: str) -> tuple[TrainState, dict[str, Any]]:
    """The saved training state and model weights; a UsageError when they cannot be resumed."""
    # A damaged file fails in many ways (EOFError, RuntimeError, UnpicklingError, KeyError...).
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unresumable(path) from e
    if not isinstance(saved, dict):
        raise _unresumable(path)
    if saved.get("fingerprint") != fingerprint:
        raise UsageError(
            f"--resume: {path} was written for another recipe, dataset or backbone; "
            "run without --resume to start over"
        )
    try:
        return TrainState.from_checkpoint(saved), saved["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise _unresumable(path) from e


def _load_resumable(path: Path, fingerprint: str) -> tuple[TrainState, dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume")
    return read_checkpoint(path, fingerprint)


def resume(
    model: nn.Module,
    cfg: TrainConfig,
    path: Path,
    fingerprint: str,
    events: TrainEvents,
    d: Dist | None = None,
) -> TrainState:
    """Load the checkpoint's weights into `model` and return its training state.

    Under torchrun rank 0 reads the file and sends it to the others, so the export folder
    need not be on a filesystem every node sees.
    """
    load = partial(_load_resumable, path, fingerprint)
    state, weights = load() if d is None else distributed.on_main(load)
    model.load_state_dict(weights)
    events.on_resume(len(state.history), cfg.phases[state.phase].name, state.epoch_in_phase)
    return state
