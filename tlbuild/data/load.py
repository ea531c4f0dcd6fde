"""The recipe's dataset as every build step sees it: scanned, checked, split, and reported."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tlbuild.artifacts import SPLITS_JSON
from tlbuild.data.duplicates_report import fingerprint_for
from tlbuild.data.scan import Splits, scan_dataset
from tlbuild.recipe import Recipe


def load_data(recipe: Recipe, console: Console) -> Splits:
    """Scan and split the recipe's data, reporting counts and skipped files."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Checking images", total=None)
        splits = scan_dataset(
            recipe.data, lambda n: progress.advance(task, n), fingerprint_for(recipe.data)
        )
    table = Table(title=f"{len(splits.classes)} classes", title_justify="left")
    counts = splits.counts()
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for c in splits.classes:
        mark = " (ok)" if c == recipe.data.ok_class else ""
        table.add_row(c + mark, *(str(counts[s][c]) for s in counts))
    console.print(table)
    if splits.skipped:
        console.print(f"[yellow]Skipped {len(splits.skipped)} unreadable file(s):[/]")
        for p, why in splits.skipped[:20]:
            console.print(f"  {p}: {why}")
        if len(splits.skipped) > 20:
            console.print(f"  ... and {len(splits.skipped) - 20} more (listed in {SPLITS_JSON})")
    return splits
