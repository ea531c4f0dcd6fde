"""The trainer: fine-tuning in phases with early stopping, per-epoch checkpoints and exact
resume; under torchrun in every process alike."""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlbuild.errors import UsageError
from tlbuild.models.factory import cpu_state_dict
from tlbuild.recipe import PhaseConfig
from tlbuild.train import distributed
from tlbuild.train.checkpoint import (
    Best,
    TrainState,
    resume,
    save_checkpoint,
    training_fingerprint,
)
from tlbuild.train.device import select_device
from tlbuild.train.events import TrainEvents
from tlbuild.train.loaders import Caches, build_caches
from tlbuild.train.lr_find import RangeTest, lr_range_test
from tlbuild.train.optim import make_optimizer, make_scheduler
from tlbuild.train.phases import apply_phase, set_train_mode
from tlbuild.train.probe import fit_probe, probe_supported
from tlbuild.train.run import TrainRun, make_run, memory_format
from tlbuild.train.settings import TrainSettings
from tlbuild.train.validate import validate_epoch


@dataclass
class TrainResult:
    """The best model (loaded) and how training went."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    device: str
    probe: dict[str, Any] | None = None
    lr_find: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Fine-tunes `model` as `settings` say, telling `events` how it goes."""

    def __init__(self, *, model: nn.Module, settings: TrainSettings, events: TrainEvents) -> None:
        self.model, self.settings, self.events = model, settings, events

    def fit(self) -> TrainResult:
        """Run every phase of `train.phases`; checkpoint each epoch; return the best model by
        val loss. Under torchrun every process calls it alike; rank 0 alone writes the
        checkpoint (distributed.py says how the processes agree)."""
        s, cfg, model = self.settings, self.settings.train, self.model
        d = distributed.join(cfg.device)
        device = select_device(cfg.device, d)
        if d is not None:
            distributed.check_world(cfg.batch_size, d.world, device)
        model.to(device, memory_format=memory_format(cfg))
        # torch.use_deterministic_algorithms is not set: on CPU it made training 1.25x slower and
        # was not needed for same seed, same machine, same weights (tests/test_train.py checks it).
        key = training_fingerprint(s.splits, cfg, s.data, s.preprocessing, s.model_key)
        if d is not None:
            # The split is computed on every rank from the same files and seed; this checks it.
            distributed.check_same(key, "data, splits, recipe or backbone")
        state = resume(model, cfg, s.checkpoint, key, self.events, d) if s.resume else TrainState()
        synced = distributed.sync_batchnorm(model, device) if d is not None else {}
        # Other ranks keep their scratch copy of the decoded images out of the export folder.
        spill_dir = s.checkpoint.parent if d is None or d.main else Path(tempfile.gettempdir())
        caches: Caches | None = None
        run: TrainRun | None = None
        try:
            caches = build_caches(s.splits, s.preprocessing, cfg, s.data, self.events, spill_dir)
            run = make_run(model, s, device, caches, d)
            _train(_Fitting(run, state, self.events, s.checkpoint, key))
        finally:
            if run is not None:
                run.unwrap()
            if caches is not None:
                for c in caches:
                    c.close()
        distributed.undo_sync_batchnorm(model, synced)
        return _finish(model, state, device)


@dataclass
class _Fitting:
    """One `fit` under way: its machinery, where it stands, and where it reports and saves."""

    run: TrainRun
    state: TrainState
    events: TrainEvents
    checkpoint: Path
    fingerprint: str


def _train(f: _Fitting) -> None:
    """The linear probe when wanted, then every phase from where the state stands."""
    _probe(f)
    with f.events.live():
        for pi in range(f.state.phase, len(f.run.cfg.phases)):
            _run_phase(f, pi)


def _probe(f: _Fitting) -> None:
    """Fit the linear probe on a fresh run when wanted; it becomes the first best candidate."""
    run, state = f.run, f.state
    model, cfg = run.model, run.cfg
    # The probe also measures what a head alone reaches, for recipes without a head-only
    # phase (a few seconds: one forward pass, no backward).
    has_frozen_phase = any(p.unfreeze == 0 for p in cfg.phases)
    wanted = cfg.head_init == "probe" or not has_frozen_phase
    if wanted and not probe_supported(model):
        f.events.on_probe_skipped(type(model.get_classifier()).__name__)  # type: ignore[operator]
        wanted = False
    if not wanted or state.history:
        return
    head = model.get_classifier()  # type: ignore[operator]
    random_head = copy.deepcopy(head.state_dict())

    def fit_head() -> tuple[Any, dict[str, torch.Tensor]]:
        found = fit_probe(model, run.loaders.plain, run.loaders.val, run.device, run.memory_format)
        return found, cpu_state_dict(head)

    if run.dist is None:
        probe = fit_head()[0]
    else:
        # Rank 0 fits it on all the images (seconds) and sends the head to the others.
        probe, fitted = distributed.on_main(fit_head)
        head.load_state_dict(fitted)
    state.probe = probe.to_dict()
    # The probed model is a candidate like any epoch: if fine-tuning never beats its
    # validation loss, the frozen body with the fitted head is what ships.
    state.best = Best(probe.val_loss, -1, cpu_state_dict(model))
    if cfg.head_init != "probe":
        head.load_state_dict(random_head)
    f.events.on_probe(probe, cfg.head_init == "probe")


def _finish(model: nn.Module, state: TrainState, device: torch.device) -> TrainResult:
    """Load the best weights into `model`, move it to the CPU for export, and report."""
    if state.best.state is not None:
        model.load_state_dict(state.best.state)
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(
        model,
        state.history,
        state.best.epoch,
        state.best.val_loss,
        str(device),
        probe=state.probe,
        lr_find=state.lr_find,
    )


def _phase_lr(f: _Fitting, phase: PhaseConfig) -> float:
    """The phase's head lr: as given, or found by the range test (once; kept for resume)."""
    if phase.name in f.state.phase_lr:
        return float(f.state.phase_lr[phase.name])
    lr = float(phase.lr) if phase.lr != "auto" else _range_test(f, phase)
    f.state.phase_lr[phase.name] = lr
    return lr


def _range_test(f: _Fitting, phase: PhaseConfig) -> float:
    """Run the lr range test for `phase`; record its curve in the state and return its choice."""
    run = f.run
    probe_groups = apply_phase(run.model, phase, 1.0)
    set_train_mode(run.model, phase)
    steps = run.cfg.lr_find_steps
    f.events.on_task_start(f"{phase.name}: lr range test", steps)

    def step(optimizer: torch.optim.Optimizer, batch: Any) -> float:
        loss = float(run.step(optimizer, *batch)[0].detach())
        f.events.on_task_step()
        return loss

    # The test's overflowing steps must not leave the training's loss scale shrunk.
    scaler_state = run.scaler.state_dict() if run.scaler.is_enabled() else None
    try:
        found = lr_range_test(
            run.model,
            probe_groups,
            lambda groups: make_optimizer(groups, run.cfg),
            run.loaders.train,
            step,
            RangeTest(phase.name, steps, run.cfg.seed),
        )
    finally:
        if scaler_state is not None:
            run.scaler.load_state_dict(scaler_state)
    f.events.on_task_end()
    if run.dist is not None:
        # Every rank saw the same all-reduced losses; rank 0's curve is the one kept all the same.
        found = distributed.broadcast(found)
    if found.steps < 3:
        raise UsageError(
            f"phase '{phase.name}': the learning-rate range test diverged within "
            f"{found.steps} step(s) even at lr 1e-6; check the data and labels, or give "
            "the phase a number for lr"
        )
    f.state.lr_find.append(found.to_dict())
    f.events.on_lr_found(phase.name, found)
    return found.chosen


def _phase_optimizer(
    f: _Fitting, phase: PhaseConfig, lr: float
) -> tuple[list[dict[str, Any]], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The phase's parameter groups, optimizer and schedule, restored from the state if saved."""
    run, state = f.run, f.state
    param_groups = apply_phase(run.model, phase, lr)
    optimizer = make_optimizer(param_groups, run.cfg)
    scheduler = make_scheduler(optimizer, run.cfg, phase.epochs, len(run.loaders.train))
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None:
            run.scaler.load_state_dict(state.scaler)
    return param_groups, optimizer, scheduler


def _run_phase(f: _Fitting, pi: int) -> None:
    """Train phase `pi` from wherever the state says it is, checkpointing every epoch."""
    run, state, events = f.run, f.state, f.events
    cfg, model = run.cfg, run.model
    phase = cfg.phases[pi]
    if pi > state.phase:
        state.enter_phase(pi)
    run.enter_phase(phase)
    lr = _phase_lr(f, phase)
    param_groups, optimizer, scheduler = _phase_optimizer(f, phase, lr)
    trainable = sum(p.numel() for g in param_groups for p in g["params"])
    lrs = (lr, lr * phase.body_lr_mult) if len(param_groups) > 1 else (lr,)
    events.on_phase_start(pi, len(cfg.phases), phase, trainable, lrs)
    for e in range(state.epoch_in_phase, phase.epochs):
        if state.phase_done:
            break
        t0 = time.perf_counter()
        row = _train_epoch(f, phase, e, len(state.history), optimizer, scheduler)
        validate_epoch(run, row, lr, optimizer, t0)
        if run.dist is not None:
            # The row decides best and early stopping: rank 0's, so every rank stops together.
            row = distributed.broadcast(row)
        is_best = state.record_epoch(row, model, cfg.early_stopping)
        state.epoch_in_phase = e + 1
        events.on_epoch_end(phase.name, row, is_best)
        state.optimizer, state.scheduler = optimizer.state_dict(), scheduler.state_dict()
        state.scaler = run.scaler.state_dict() if run.scaler.is_enabled() else None
        # No barrier after it: a resumed run gets the file from rank 0 (checkpoint.resume).
        if run.main:
            save_checkpoint(f.checkpoint, model, state, f.fingerprint)
        if state.phase_done:
            events.on_early_stop(cfg.early_stopping.patience)
    # Continue the next phase from the best weights so far, not from an overfit tail.
    if state.best.state is not None:
        model.load_state_dict(state.best.state)


def _train_epoch(
    f: _Fitting,
    phase: PhaseConfig,
    e: int,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> dict[str, Any]:
    """One pass over the training data: epoch `e` of `phase`, `epoch` of the whole run."""
    run = f.run
    # Seeding per epoch (not once) makes a resumed run draw the same augmentations
    # and batches as an uninterrupted one. The batches' generator is seeded alike on every
    # rank (the ranks share one order); the augmentations differ per rank (rank 0's are a
    # single process's).
    rank = run.dist.rank if run.dist is not None else 0
    torch.manual_seed(run.cfg.seed * 100_003 + epoch + 1_000_003 * rank)
    run.loaders.gen.manual_seed(run.cfg.seed * 100_003 + epoch)
    set_train_mode(run.model, phase)
    t0 = time.perf_counter()
    f.events.on_task_start(f"{phase.name} {e + 1}/{phase.epochs}", len(run.loaders.train))
    tot_loss, tot_correct, seen = 0.0, 0, 0
    world = run.dist.world if run.dist is not None else 1
    for x, y in run.loaders.train:
        loss, out = run.step(optimizer, x, y)
        if not torch.isfinite(loss):
            raise UsageError(
                f"training diverged (loss {loss.item()}) in phase '{phase.name}'; "
                "lower the phase's lr"
            )
        scheduler.step()
        n = y.shape[0]
        tot_loss += loss.item() * n
        tot_correct += int((out.argmax(1).cpu() == y).sum())
        seen += n
        rate = seen * world / (time.perf_counter() - t0)
        f.events.on_task_step(f"loss {tot_loss / seen:.3f} {rate:.1f} img/s")
    f.events.on_task_end()
    if run.dist is not None:
        tot_loss, tot_correct, seen = run.all_sum(tot_loss, tot_correct, seen)
    return {
        "epoch": epoch,
        "stage": phase.name,  # history.csv's column keeps its name from before phases
        "train_loss": tot_loss / max(1, seen),
        "train_acc": tot_correct / max(1, seen),
    }
