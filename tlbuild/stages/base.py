"""What a stage is: the one object each module under tlbuild/stages/ exports as STAGE."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tlbuild.manifest import drop_section
from tlbuild.recipe import Recipe
from tlbuild.runtime.providers import Placement, placement_for


class StageDeferred(Exception):  # noqa: N818 - not an error: work put off to the next build
    """A stage could not do its work now for a reason outside the build (an optional service
    that does not answer): the build goes on, the stage stays stale, the next run tries again."""


@dataclass(frozen=True)
class StageContext:
    """What a stage runs with: the current recipe, where to print, and --resume."""

    recipe: Recipe
    console: Console
    resume: bool = False

    @property
    def out(self) -> Path:
        """The export folder."""
        return self.recipe.out_dir

    def checks_on(self) -> Placement:
        """Where this stage runs its ONNX models: ONNX Runtime's CUDA provider on train.device's
        GPU where it starts here, else the CPU (said, with the reason, where a GPU was meant)."""
        on = placement_for(self.recipe.train.device)
        if on.provider != "cpu":
            self.console.print(f"  checks on {on.label}")
        elif on.why_cpu:
            self.console.print(f"  [yellow]checks on the CPU:[/] {escape(on.why_cpu)}")
        return on


def _never(recipe: Recipe) -> str | None:
    return None


@dataclass(frozen=True)
class Stage:
    """One step of the build: what it reads, what it writes, and how to run it.

    The runner (tlbuild/runner.py) composes stages in order and knows none by name. A stage's
    code key is derived from the imports of the module its `run` lives in.
    """

    name: str
    sections: tuple[str, ...]  # recipe sections that are its settings
    inputs: tuple[str, ...]  # export-folder files it reads (globs); their makers' changes
    # clear this stage's outputs, so a folder never mixes a new model with old derived files
    outputs: tuple[str, ...]  # files it writes (globs), hashed when it finishes
    run: Callable[[StageContext], Any]
    summarise: Callable[[Any], str]  # one line for build_state.json and the report
    disabled: Callable[[Recipe], str | None] = _never  # why it is off in a recipe, or None
    aliases: tuple[str, ...] = ()  # other names --force accepts
    data: bool = False  # keyed on the dataset's file list
    machine: bool = False  # keyed on this machine (GPU, libraries)
    distributed: bool = False  # runs in every torchrun process (train); others on rank 0 alone
    # The earlier stages whose outputs key it; () = every earlier one. A stage that reads only
    # training's files names it, so a new benchmark does not redo its work.
    upstream: tuple[str, ...] = ()
    # Keys of its sections that change how fast it runs, not what it produces.
    ignored_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module that implements it (its code key follows that module's imports)."""
        return self.run.__module__

    def files(self, out: Path) -> list[Path]:
        """Its output files present in `out`."""
        found = {p for pattern in self.outputs for p in out.glob(pattern) if p.is_file()}
        return sorted(found)

    def reads(self, names: list[str]) -> bool:
        """Whether any of `names` (files of an export folder) is one of its inputs."""
        return any(fnmatch.fnmatch(n, pattern) for n in names for pattern in self.inputs)

    def cleanup(self, out: Path) -> None:
        """Remove its files and its manifest section (turned off, or its inputs changed)."""
        folders = set()
        for p in self.files(out):
            p.unlink(missing_ok=True)
            folders |= {d for d in p.parents if d != out and out in d.parents}
        for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                d.rmdir()
        drop_section(out, self.name)
