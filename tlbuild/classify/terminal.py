"""The classify command's terminal: a live images/s line, capped warnings on stderr and the
closing summary table. The work itself is classify/run.py's."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tlbuild.classify.options import ClassifyOptions
from tlbuild.classify.run import ClassifySummary, Kept, classify
from tlbuild.novelty.drift import drift_line

# Beyond this many, warnings only count: a folder of bad files must not flood the terminal.
_SHOWN_WARNINGS = 20


class _Rate(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        return Text(f"{task.speed:.0f} img/s" if task.speed else "", style="cyan")


def classify_with_progress(
    inputs: Sequence[str],
    model: str,
    out: str,
    options: ClassifyOptions,
    console: Console,
    kept: Kept,
) -> ClassifySummary:
    """Run classify with a progress line on `console` and the first warnings on stderr."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    shown = 0

    def warn(msg: str) -> None:
        nonlocal shown
        shown += 1
        if shown <= _SHOWN_WARNINGS:
            err.print(f"[yellow]warning:[/] {escape(msg)}", markup=True)
        elif shown == _SHOWN_WARNINGS + 1:
            err.print("[yellow]warning:[/] more warnings follow; see the summary", markup=True)

    with Progress(
        SpinnerColumn(),
        TextColumn("Classifying"),
        TextColumn("{task.completed:,.0f} images"),
        _Rate(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        speed_estimate_period=10.0,
    ) as progress:
        task = progress.add_task("classify", total=None)

        def advance(n: int) -> None:
            progress.advance(task, n)

        return classify(list(inputs), model, out, options, advance, warn, kept)


def print_summary(console: Console, s: ClassifySummary) -> None:
    """The class mix, the errors by reason, the decision rule and where the rows went."""
    # One denominator per column: every file this run, and the readable ones (what the
    # class mix is about); an error has no share of the readable files.
    ok_rows = s.rows - s.errors
    table = Table(
        "label",
        "files",
        "of all files",
        "of readable",
        title=f"{s.rows:,} file{'s' * (s.rows != 1)} classified with {s.artifact}",
    )
    for label, n in sorted(s.labels.items(), key=lambda kv: -kv[1]):
        table.add_row(label, f"{n:,}", f"{n / max(s.rows, 1):.1%}", f"{n / max(ok_rows, 1):.1%}")
    if s.errors:
        table.add_row("[red]error[/]", f"{s.errors:,}", f"{s.errors / max(s.rows, 1):.1%}", "-")
    console.print(table)
    if s.error_reasons:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in s.error_reasons.most_common(5))
        console.print(f"Errors by reason: {reasons}")
    if s.decision:  # a threshold rule, and whether the manifest or --threshold set it
        console.print(escape(s.decision))
    if s.novelty:
        console.print(escape(s.novelty))
        # Novel images are never counted as good parts: they go to review.
        console.print(
            f"Flagged for review (unlike the training images): {s.novel:,} of {ok_rows:,} "
            "readable images" + (", never counted as good" if s.ok_class is not None else "")
        )
    if s.ok_class is not None:
        # Say the rule that decided: with a threshold, an image whose top class is ok can
        # still be defective.
        how = f"not '{s.ok_class}'" if s.rule in (None, "argmax") else s.rule
        if s.novel:
            how += " or flagged for review"
        console.print(f"Defective ({how}): {s.defective:,} of {ok_rows:,} readable images")
    if s.drift_figures:
        console.print(escape(drift_line(s.drift_figures)))
    extra = []
    if s.skipped:
        extra.append(f"{s.skipped:,} already in --out (resumed)")
    if s.ignored_files:
        extra.append(f"{s.ignored_files:,} files with other extensions ignored")
    if s.warnings:
        extra.append(f"{s.warnings:,} warnings")
    if extra:
        console.print("; ".join(extra).capitalize())
    if s.parts is not None:
        console.print(f"Compacted: {s.parts[0]:,} part files -> {s.parts[1]:,}")
    on = f"{s.backend}, engine ray" if s.engine == "ray" else s.backend
    console.print(
        f"[bold green]Done[/]: {s.rows:,} rows in {s.seconds:.1f}s ({s.rate:,.0f} img/s, "
        f"{on}) -> {s.out} ({s.previous_rows + s.rows:,} rows in all)"
    )
