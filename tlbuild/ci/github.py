"""GitHub Actions' job summary: where $GITHUB_STEP_SUMMARY names a file, each command appends its
gates and headline figures to it as Markdown, and the job's page shows them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tlbuild.gates import GateResult

STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def summary_markdown(title: str, gates: Sequence[GateResult], headline: list[list[str]]) -> str:
    """The section one command adds: its verdict, headline figures and gates table."""
    failed = [g for g in gates if g.failed]
    if not gates:
        verdict = "no gates configured"
    elif failed:
        verdict = f":x: **{len(failed)} of {len(gates)} gates failed**"
    else:
        verdict = f":white_check_mark: all {len(gates)} gates passed"
    lines = [f"### {_cell(title)}", "", verdict, ""]
    if headline:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in headline]
        lines.append("")
    if gates:
        lines += ["| gate | threshold | measured | result | note |", "|---|--:|--:|---|---|"]
        mark = {"passed": ":white_check_mark: passed", "failed": ":x: **FAILED**"}
        for g in gates:
            lines.append(
                f"| `{_cell(g.gate)}` | {g.threshold:g} | {_value(g.measured)} "
                f"| {mark.get(g.status, g.status)} | {_cell(g.note)} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def append_step_summary(text: str, environ: dict[str, str] | None = None) -> Path | None:
    """Append `text` to the job summary file where $GITHUB_STEP_SUMMARY is set; its path."""
    target = (environ if environ is not None else os.environ).get(STEP_SUMMARY)
    if not target:
        return None
    path = Path(target)
    # Appended, as GitHub documents: earlier steps' sections stay above this one.
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
    return path
