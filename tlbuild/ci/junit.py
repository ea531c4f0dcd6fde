"""Gates as JUnit XML, the test-report format GitLab, Jenkins and GitHub's test-report actions
all display: one test case per gate, a failure carrying the measured value, the threshold and
the note; a gate that could not be measured here is a skipped case with the reason."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree as ET

from tlbuild.fileio import write_text
from tlbuild.gates import GateResult


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _case(suite: ET.Element, classname: str, g: GateResult) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=g.gate, time="0")
    detail = f"gate: {g.gate}\nmeasured: {_value(g.measured)}\nthreshold: {g.threshold:g}" + (
        f"\nnote: {g.note}" if g.note else ""
    )
    if g.failed:
        message = f"measured {_value(g.measured)}, threshold {g.threshold:g}"
        if g.note:
            message += f" ({g.note})"
        failure = ET.SubElement(case, "failure", message=message, type="GateFailed")
        failure.text = detail
    elif g.status != "passed":
        ET.SubElement(case, "skipped", message=f"{g.status}: {g.note}" if g.note else g.status)
    else:
        out = ET.SubElement(case, "system-out")
        out.text = detail


def junit_xml(
    suite_name: str,
    gates: Sequence[GateResult],
    seconds: float = 0.0,
    error: str | None = None,
    properties: dict[str, str] | None = None,
) -> bytes:
    """The JUnit document for one command: a suite `suite_name` with a case per gate, and an
    `error` case when the command stopped before its gates could be judged."""
    failures = sum(g.failed for g in gates)
    skipped = sum(g.status not in ("passed", "failed") for g in gates)
    counts = {
        "tests": str(max(len(gates) + (error is not None), 1)),
        "failures": str(failures),
        "errors": str(int(error is not None)),
        "skipped": str(skipped),
        "time": f"{seconds:.3f}",
    }
    root = ET.Element("testsuites", name="tlbuild", **counts)
    suite = ET.SubElement(
        root,
        "testsuite",
        name=suite_name,
        timestamp=datetime.now(UTC).replace(microsecond=0).isoformat(),
        hostname=platform.node() or "localhost",
        **counts,
    )
    if properties:
        props = ET.SubElement(suite, "properties")
        for k, v in properties.items():
            ET.SubElement(props, "property", name=k, value=str(v))
    classname = "tlbuild." + suite_name.replace(" ", ".")
    if error is not None:
        case = ET.SubElement(suite, "testcase", classname=classname, name="build", time="0")
        ET.SubElement(case, "error", message=error, type="BuildError").text = error
    for g in gates:
        _case(suite, classname, g)
    if not gates and error is None:  # a report with no case reads as "no tests ran"
        ET.SubElement(suite, "testcase", classname=classname, name="completed", time="0")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(
    path: Path,
    suite_name: str,
    gates: Sequence[GateResult],
    started: float,
    error: str | None = None,
    properties: dict[str, str] | None = None,
) -> Path:
    """Write the JUnit file atomically; `started` is the command's time.perf_counter() start."""
    seconds = time.perf_counter() - started
    body = junit_xml(suite_name, gates, seconds, error, properties)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, body.decode("utf-8"))
    return path
