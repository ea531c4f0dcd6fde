"""What training reports as it goes, as callbacks (the way Ultralytics' trainer reports): the
trainer calls the hooks, and the events it is given decide what is shown.

`RichEvents` prints to a rich Console with transient progress bars (the train stage, cv folds);
`SilentEvents` shows nothing (torchrun's processes other than rank 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from tlbuild.recipe import PhaseConfig
    from tlbuild.train.lr_find import LrFindResult
    from tlbuild.train.probe import ProbeResult


class TrainEvents:
    """The hooks training calls; each does nothing here, so an implementation overrides some."""

    def live(self) -> contextlib.AbstractContextManager[Any]:
        """The span of one progress display (decoding, then the phases); bars show inside it."""
        return contextlib.nullcontext()

    def on_task_start(self, description: str, total: int) -> None:
        """A progress bar of `total` steps starts; one runs at a time."""

    def on_task_step(self, info: str | None = None) -> None:
        """The bar advances one step; `info`, when given, replaces the text beside it."""

    def on_task_end(self) -> None:
        """The bar is done and goes."""

    def on_decoded(self, images: int, ram_bytes: int, spilled_bytes: int, seconds: float) -> None:
        """The training and validation images are decoded into the cache."""

    def on_resume(self, epochs_done: int, phase: str, epoch_in_phase: int) -> None:
        """Training goes on from a checkpoint."""

    def on_probe_skipped(self, head: str) -> None:
        """The linear probe was wanted, but the model's head (`head`, its type) is not linear."""

    def on_probe(self, probe: ProbeResult, starts_from_it: bool) -> None:
        """The linear probe is fitted; fine-tuning starts from its head when `starts_from_it`."""

    def on_lr_found(self, phase: str, found: LrFindResult) -> None:
        """The lr range test chose `phase`'s head learning rate."""

    def on_phase_start(
        self, index: int, count: int, phase: PhaseConfig, trainable: int, lrs: tuple[float, ...]
    ) -> None:
        """Phase `index` of `count` starts: its trainable parameters, head (and body) lr."""

    def on_epoch_end(self, phase: str, row: dict[str, Any], is_best: bool) -> None:
        """An epoch's history row is complete; `is_best` when its val loss is the best so far."""

    def on_early_stop(self, patience: int) -> None:
        """The phase stops: `patience` epochs without a val-loss improvement."""


class SilentEvents(TrainEvents):
    """Shows nothing: torchrun's processes other than rank 0 (rank 0 speaks for them)."""


class RichEvents(TrainEvents):
    """Lines on a rich Console and transient progress bars that leave nothing behind."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: Any = None

    @contextlib.contextmanager
    def live(self) -> Iterator[Progress]:
        """One transient rich Progress for the bars started inside it."""
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            self._progress = progress
            try:
                yield progress
            finally:
                self._progress = self._task = None

    def on_task_start(self, description: str, total: int) -> None:
        """Add the bar to the live display."""
        assert self._progress is not None, "a progress bar outside RichEvents.live()"
        self._task = self._progress.add_task(description, total=total, info="")

    def on_task_step(self, info: str | None = None) -> None:
        """Advance the bar (and set its text)."""
        assert self._progress is not None
        if info is None:
            self._progress.advance(self._task)
        else:
            self._progress.update(self._task, advance=1, info=info)

    def on_task_end(self) -> None:
        """Remove the bar."""
        assert self._progress is not None
        self._progress.remove_task(self._task)
        self._task = None

    def on_decoded(self, images: int, ram_bytes: int, spilled_bytes: int, seconds: float) -> None:
        """How many images, where they are kept, how long it took."""
        self.console.print(
            f"Decoded {images} images once ({ram_bytes / 2**20:.0f} MiB in memory"
            + (f", {spilled_bytes / 2**20:.0f} MiB in a mapped file" if spilled_bytes else "")
            + f", {seconds:.1f}s)"
        )

    def on_resume(self, epochs_done: int, phase: str, epoch_in_phase: int) -> None:
        """Where training goes on."""
        self.console.print(
            f"Resuming after epoch {epochs_done} (phase '{phase}', epoch {epoch_in_phase})"
        )

    def on_probe_skipped(self, head: str) -> None:
        """Why there is no probe."""
        self.console.print(
            f"[yellow]No linear probe: {head} is not a single linear head; the head starts "
            "from random weights.[/]"
        )

    def on_probe(self, probe: ProbeResult, starts_from_it: bool) -> None:
        """What the head alone reaches."""
        self.console.print(
            f"Head alone on frozen pretrained features (linear probe): val accuracy "
            f"{probe.val_accuracy:.1%} ({probe.seconds:.1f}s)"
            + ("; fine-tuning starts from it" if starts_from_it else "")
        )

    def on_lr_found(self, phase: str, found: LrFindResult) -> None:
        """The rate the range test chose."""
        self.console.print(
            f"  lr range test ({found.steps} steps, valley rule): phase '{phase}' "
            f"lr = {found.chosen:.3g}"
        )

    def on_phase_start(
        self, index: int, count: int, phase: PhaseConfig, trainable: int, lrs: tuple[float, ...]
    ) -> None:
        """The phase's heading line."""
        self.console.print(
            f"[bold]Phase {index + 1}/{count} '{escape(phase.name)}'[/]: "
            f"{trainable:,} trainable parameters, head lr {lrs[0]:g}"
            + (f", body lr {lrs[1]:g}" if len(lrs) > 1 else "")
        )

    def on_epoch_end(self, phase: str, row: dict[str, Any], is_best: bool) -> None:
        """One line per epoch: losses, accuracies, seconds, and whether it is the best."""
        mark = " [green]best[/]" if is_best else ""
        tag = escape(f"[{phase}]")  # a phase name in brackets is not rich markup
        self.console.print(
            f"  epoch {row['epoch'] + 1:>2} {tag} train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} "
            f"acc {row['val_acc']:.3f} | {row['seconds']:.1f}s{mark}"
        )

    def on_early_stop(self, patience: int) -> None:
        """Why the phase ended early."""
        self.console.print(f"  early stop: no val-loss improvement for {patience} epoch(s)")
