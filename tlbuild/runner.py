"""Run the stages of tlbuild/stages/ in order, each only when its inputs changed.

The runner knows no stage by name: it asks each Stage whether it is enabled, keys it
(incremental.py), runs it, records it, and clears the stages that read what it rewrote.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tlbuild.artifacts import CHECKPOINTS, SCRATCH
from tlbuild.errors import UsageError
from tlbuild.fileio import dead_temp_files
from tlbuild.folder_lock import folder_lock
from tlbuild.gates import GateResult, evaluate_gates
from tlbuild.incremental import StageRecords
from tlbuild.manifest import put_section, take_section
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext, StageDeferred
from tlbuild.stages.order import STAGES
from tlbuild.train import distributed

# Runs a distributed stage in other processes (`--nproc-per-node`), which record it themselves;
# returns its seconds.
Launcher = Callable[[Stage], float]


@dataclass
class StageOutcome:
    """What `run` did with one stage."""

    stage: str
    action: str  # "ran", "reused", "disabled", "deferred"; `status`: "fresh", "stale", "disabled"
    why: list[str]
    seconds: float = 0.0


@dataclass
class RunResult:
    """The outcome of `run`: per-stage actions and the gates."""

    out: Path
    stages: list[StageOutcome]
    gates: list[GateResult]

    @property
    def failed_gates(self) -> list[GateResult]:
        """Gates that were measured and missed."""
        return [g for g in self.gates if g.failed]


def stage_names() -> list[str]:
    """Every stage's name, in order."""
    return [s.name for s in STAGES]


def find_stage(name: str) -> Stage:
    """The stage called `name` (or one of its aliases)."""
    for s in STAGES:
        if name == s.name or name in s.aliases:
            return s
    raise UsageError(f"no stage '{name}'; stages: {', '.join(stage_names())}")


class _Machine:
    """The machine key for stages keyed on the machine, computed once per command (it runs
    nvidia-smi and imports torch) and only if such a stage is looked at."""

    def __init__(self) -> None:
        self._key: dict[str, Any] | None = None

    def __call__(self, stage: Stage) -> dict[str, Any] | None:
        if not stage.machine:
            return None
        if self._key is None:
            from tlbuild.bench.environment import environment, machine_key

            self._key = machine_key(environment())
        return self._key


def _earlier(stage: Stage) -> tuple[Stage, ...]:
    before = STAGES[: STAGES.index(stage)]
    return tuple(s for s in before if s.name in stage.upstream) if stage.upstream else before


ASIDE = ".aside"  # readers' files while the stage they read from runs


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A fresh name: two commands starting together must not trip over one probe file.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(
            f"cannot write to the export folder {out} ({e.strerror}); "
            "set output_dir in the recipe to a writable folder"
        ) from None


def _remove_leftovers(out: Path) -> None:
    """What a killed run leaves: temporary files of writers that have exited, files set aside
    (their stages then see them missing and rerun) and unjudged candidates in .scratch/.
    Called with the folder's lock held, so no other build is using .aside/ or .scratch/, and
    another live process's temporary files are kept."""
    for folder in (out, out / CHECKPOINTS):  # checkpoints/ holds the decode cache's spill
        for p in dead_temp_files(folder):
            p.unlink(missing_ok=True)
    for name in (ASIDE, SCRATCH):
        box = out / name
        if box.is_symlink() or box.is_file():  # never follow it: files moved there would leave
            box.unlink()
        shutil.rmtree(box, ignore_errors=True)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """The export folder, writable and locked for this command, with a killed run's leftovers
    removed."""
    _prepare_out_dir(out)
    with folder_lock(out):
        _remove_leftovers(out)
        yield


class _ReadersAside:
    """While a stage runs, the later stages that read its files are set aside (their files
    moved, their manifest sections taken out), so a failed or killed run never leaves a new
    model beside files derived from the old one. When the stage ends, failed or not, with the
    same bytes on disk as before, they come back untouched (and stay fresh if it finished);
    otherwise they are removed and marked stale."""

    def __init__(self, records: StageRecords, stage: Stage) -> None:
        self.records, self.stage, self.out = records, stage, records.out
        self.before = (records.finished(stage.name) or {}).get("outputs")
        names = [self._key(p) for p in stage.files(self.out)]
        names += list((self.before or {}).get("files", {}))
        self.readers = [
            later
            for later in STAGES[STAGES.index(stage) + 1 :]
            if later.reads(names) and (later.files(self.out) or later.name in records.stages)
        ]
        self.saved: dict[str, tuple[list[str], dict[str, Any] | None]] = {}

    def _key(self, p: Path) -> str:
        """A file's name in the records: its path in the export folder (conformance/...)."""
        return p.relative_to(self.out).as_posix()

    def __enter__(self) -> _ReadersAside:
        for r in self.readers:
            box = self.out / ASIDE / r.name
            box.mkdir(parents=True, exist_ok=True)
            files = [self._key(p) for p in r.files(self.out)]
            for name in files:
                (box / name).parent.mkdir(parents=True, exist_ok=True)
                (self.out / name).replace(box / name)
            self.saved[r.name] = (files, take_section(self.out, r.name))
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            # A finished stage's record was just hashed from the disk; a failed one is hashed
            # here (it may have failed before writing, changing nothing).
            done = self.records.finished(self.stage.name) if exc_type is None else None
            after = done["outputs"] if done else self.records.outputs(self.stage)
            same = self.before is not None and after == self.before
            for r in self.readers:
                files, section = self.saved.get(r.name, ([], None))
                if same:
                    for name in files:
                        (self.out / name).parent.mkdir(parents=True, exist_ok=True)
                        (self.out / ASIDE / r.name / name).replace(self.out / name)
                    if section is not None:
                        put_section(self.out, r.name, section)
                else:
                    self.records.forget(r.name, f"cleared: {self.stage.name} ran again")
        finally:
            shutil.rmtree(self.out / ASIDE, ignore_errors=True)


def _run_recorded(
    records: StageRecords, stage: Stage, inputs: dict[str, Any], ctx: StageContext
) -> float:
    """Run one stage and record it: marked started first, so a kill leaves it stale."""
    with _ReadersAside(records, stage):
        records.start(stage.name)
        t0 = time.perf_counter()
        result = stage.run(ctx)
        seconds = time.perf_counter() - t0
        records.finish(stage, inputs, seconds, stage.summarise(result))
    return seconds


def _put_off(records: StageRecords, stage: Stage, why: StageDeferred, console: Console) -> None:
    """A stage that could not do its work now: said, and left stale for the next run."""
    console.print(f"[yellow]warning:[/] {stage.name}: {escape(str(why))}")
    records.forget(stage.name, f"put off: {why}")


def run_one(recipe: Recipe, console: Console, name: str, resume: bool = False) -> None:
    """Run one stage unconditionally (the single-stage commands) and record it.

    Under torchrun, rank 0 does this; the other processes only run a distributed stage's
    body beside it (it writes nothing there) and nothing else.
    """
    stage = find_stage(name)
    if not distributed.is_main_process():
        if stage.distributed:
            stage.run(StageContext(recipe, console, resume))
        return
    with _writing(recipe.out_dir):
        records = StageRecords(recipe.out_dir)
        inputs = records.inputs(stage, _earlier(stage), recipe, _Machine()(stage))
        try:
            _run_recorded(records, stage, inputs, StageContext(recipe, console, resume))
        except StageDeferred as e:
            _put_off(records, stage, e, console)


def call_stage(name: str, recipe: Recipe, console: Console, resume: bool = False) -> Any:
    """Run one stage's body without recording it; its typed result (benchmarks, tests)."""
    if not distributed.is_main_process():
        return find_stage(name).run(StageContext(recipe, console, resume))
    with _writing(recipe.out_dir):
        return find_stage(name).run(StageContext(recipe, console, resume))


def stage_status(recipe: Recipe) -> list[StageOutcome]:
    """Fresh or stale per stage, and why; runs nothing."""
    records = StageRecords(recipe.out_dir)
    machine = _Machine()
    rows = []
    for stage in STAGES:
        off = stage.disabled(recipe)
        if off:
            rows.append(StageOutcome(stage.name, "disabled", [off]))
            records.stages.pop(stage.name, None)  # as `run` will: later stages then show stale
            continue
        inputs = records.inputs(stage, _earlier(stage), recipe, machine(stage))
        fresh, why = records.check(stage, inputs)
        rows.append(StageOutcome(stage.name, "fresh" if fresh else "stale", why))
    return rows


def _forced(force: tuple[str, ...]) -> set[str]:
    if "all" in force:
        return set(stage_names())
    known = {n for s in STAGES for n in (s.name, *s.aliases)}
    unknown = sorted(set(force) - known)
    if unknown:
        raise UsageError(
            f"--force {', '.join(unknown)}: not a stage; use {', '.join(stage_names())} or all"
        )
    return {find_stage(name).name for name in force}


def follow(recipe: Recipe, console: Console, resume: bool = False) -> None:
    """`run` on a torchrun process other than rank 0: train beside it when rank 0 says so.

    Rank 0 decides (`run` tells every distributed stage's fate, in order) and builds the
    other stages alone; this process ends once the distributed stages are past.
    """
    distributed.join(recipe.train.device)
    for stage in STAGES:
        if stage.distributed and distributed.broadcast(None):
            stage.run(StageContext(recipe, console, resume))


def run(
    recipe: Recipe,
    console: Console,
    resume: bool = False,
    force: tuple[str, ...] = (),
    launch: Launcher | None = None,
) -> RunResult:
    """The whole build, redoing only the stages whose inputs changed (or `force`d ones).

    Under torchrun this is rank 0 (the others `follow`). With `launch`, a distributed stage
    that must run is run by it, in other processes, and its record read back.
    """
    forced = _forced(force)
    d = distributed.join(recipe.train.device)
    out = recipe.out_dir
    with _writing(out):
        return _run_stages(recipe, console, resume, forced, launch, d is not None)


def _run_stages(
    recipe: Recipe,
    console: Console,
    resume: bool,
    forced: set[str],
    launch: Launcher | None,
    several: bool,
) -> RunResult:
    out = recipe.out_dir
    records = StageRecords(out)
    machine = _Machine()
    ctx = StageContext(recipe, console, resume)
    outcomes: list[StageOutcome] = []
    for stage in STAGES:
        off = stage.disabled(recipe)
        if off:
            if stage.distributed and several:
                distributed.broadcast(False)  # the other processes have nothing to do
            stage.cleanup(out)  # idempotent; also cleans up after a killed run
            records.drop(stage.name)  # later stages see the change (their inputs hash it)
            outcomes.append(StageOutcome(stage.name, "disabled", [off]))
            continue
        inputs = records.inputs(stage, _earlier(stage), recipe, machine(stage))
        fresh, why = records.check(stage, inputs)
        if stage.name in forced:
            fresh, why = False, ["forced with --force"]
        if stage.distributed and several:
            distributed.broadcast(not fresh)  # whether the other processes train (follow)
        if fresh:
            console.print(f"[green]✓[/] {stage.name}: up to date, reused")
            outcomes.append(StageOutcome(stage.name, "reused", []))
            continue
        console.rule(f"[bold]{stage.name}[/] — {escape('; '.join(why))}", align="left", style="dim")
        if stage.distributed and launch is not None:
            seconds = launch(stage)
            records = StageRecords(out)  # what the launched processes recorded
        else:
            try:
                seconds = _run_recorded(records, stage, inputs, ctx)
            except StageDeferred as e:
                _put_off(records, stage, e, console)
                outcomes.append(StageOutcome(stage.name, "deferred", [str(e)]))
                continue
        outcomes.append(StageOutcome(stage.name, "ran", why, seconds))
    # Gates are checked on every run, reused stages or not: CI must fail while they fail.
    return RunResult(out, outcomes, evaluate_gates(recipe.gates, out))
