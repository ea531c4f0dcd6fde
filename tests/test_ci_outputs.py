"""What a CI page shows: gates as JUnit XML (read back with a JUnit parser), the GitHub Actions
job summary, and report.html, self-contained, opened in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from junitparser import Error, Failure, JUnitXml, Skipped
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tlbuild.cli import app
from tlbuild.report_html import FAILED_RGB, NONE_RGB, PASSED_RGB, verdict_banner

runner = CliRunner()

GATES = """
[gates]
min_accuracy = 0.0
max_p99_ms = { "model.onnx" = { 1 = 0.000001 }, "model.engine" = { 1 = 5.0 } }
"""


def _copy(tiny_build: Path, tiny_data: Path, folder: Path, extra: str = "") -> Path:
    recipe = tiny_recipe(folder, tiny_data, extra=extra)
    shutil.copytree(tiny_build, folder / "out" / "tiny")
    return recipe


def _cases(path: Path) -> dict[str, object]:
    suites = JUnitXml.fromfile(str(path))
    return {case.name: case for suite in suites for case in suite}


def test_run_writes_each_gate_as_a_junit_case_and_the_github_summary(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = _copy(tiny_build, tiny_data, tmp_path, GATES)
    junit, summary = tmp_path / "ci" / "gates.xml", tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    res = runner.invoke(
        app,
        ["run", str(recipe), "--junit", str(junit)],
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert res.exit_code == 1, res.output  # no model answers in a microsecond
    cases = _cases(junit)
    failed = {n: c for n, c in cases.items() if any(isinstance(r, Failure) for r in c.result)}
    assert list(failed) == ["max_p99_ms[model.onnx on onnxruntime:CPUExecutionProvider, batch 1]"]
    (failure,) = next(iter(failed.values())).result
    assert "threshold 1e-06" in failure.message and "measured" in failure.message
    assert "measured:" in failure.text and "threshold: 1e-06" in failure.text
    passed = [n for n, c in cases.items() if not c.result]
    assert any(n.startswith("min_accuracy[") for n in passed)
    skipped = [n for n, c in cases.items() if any(isinstance(r, Skipped) for r in c.result)]
    assert skipped == ["max_p99_ms[model.engine, batch 1]"]  # not measured on this machine
    (why,) = cases[skipped[0]].result
    assert "not measured" in why.message and "not benchmarked on this machine" in why.message
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert suite.name == "run tiny" and suite.failures == len(failed)
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, not replaced
    assert "### tlbuild run tiny" in text and "gates failed" in text
    assert "| accuracy |" in text and "`max_p99_ms[model.onnx on" in text


def test_a_run_that_stops_on_an_error_is_one_errored_case(tmp_path: Path) -> None:
    junit = tmp_path / "gates.xml"
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[data]\nroot = "nowhere"\n')
    res = runner.invoke(app, ["run", str(recipe), "--junit", str(junit)])
    assert res.exit_code == 2
    (case,) = _cases(junit).values()
    (error,) = case.result
    assert isinstance(error, Error) and "nowhere" in error.message


def test_bench_folder_judges_the_recorded_gates_on_this_machine(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    # On a device there is no recipe: `bench DIR` judges the [gates] the build recorded.
    slow = '[gates]\nmax_p99_ms = { "model.onnx" = { 1 = 0.000001 } }\n'
    recipe = _copy(tiny_build, tiny_data, tmp_path, slow)
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 1
    device = tmp_path / "device"
    shutil.copytree(recipe.parent / "out" / "tiny", device)
    junit = tmp_path / "bench.xml"
    res = runner.invoke(app, ["bench", str(device), "--junit", str(junit)])
    assert res.exit_code == 1, res.output
    cases = _cases(junit)
    (name,) = [n for n in cases if n.startswith("max_p99_ms[model.onnx on")]
    (failure,) = cases[name].result
    assert isinstance(failure, Failure) and "threshold 1e-06" in failure.message


def test_classify_writes_its_error_rate_as_a_junit_case(tiny_build: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 90, 30)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    junit = tmp_path / "classify.xml"
    args = ["classify", str(images), "--model", str(tiny_build), "--junit", str(junit)]
    res = runner.invoke(
        app, [*args, "--out", str(tmp_path / "a.parquet"), "--max-error-rate", "0.1"]
    )
    assert res.exit_code == 1, res.output
    (failure,) = _cases(junit)["max_error_rate"].result
    assert (
        isinstance(failure, Failure) and "1 of 4 inputs could not be classified" in failure.message
    )
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b.parquet")])
    assert res.exit_code == 0, res.output
    (case,) = _cases(junit).values()  # no gate asked for: one passing case, never "no tests"
    assert case.name == "completed" and not case.result


def _browser() -> str:
    for name in ("chromium-headless-shell", "chromium", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless Chromium here (Debian: apt-get install chromium-headless-shell)")


def _screenshot(page: Path, shot: Path) -> np.ndarray:
    subprocess.run(
        [
            _browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _colourful(pixels: np.ndarray) -> int:
    """Pixels whose channels differ by more than 60: plots, not black text on white."""
    return int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())


def test_report_html_opens_alone_in_a_browser_with_its_plots(
    tiny_build: Path, tmp_path: Path
) -> None:
    # Copied alone, as a downloaded CI artifact is: nothing beside it to load.
    page = tmp_path / "download" / "report.html"
    page.parent.mkdir()
    shutil.copy(tiny_build / "report.html", page)
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') >= 3 and 'src="report_' not in text
    shown = _screenshot(page, tmp_path / "shot.png")
    banner = shown[:80]
    assert (np.abs(banner - NONE_RGB).max(axis=2) <= 6).sum() > 5000  # no gates in this recipe
    # The same page with its images' data taken out: what the plots add is what the browser
    # decoded from the page itself.
    bare = tmp_path / "bare" / "report.html"
    bare.parent.mkdir()
    bare.write_text(re.sub(r'src="data:[^"]*"', 'src="gone.png"', text))
    without = _screenshot(bare, tmp_path / "bare.png")
    assert _colourful(shown[80:]) > 5000
    assert _colourful(shown[80:]) > 10 * max(_colourful(without[80:]), 1)


def test_verdict_banner_says_passed_failed_or_none() -> None:
    assert "rgb(26, 127, 55)" in verdict_banner(3, 0) and str(PASSED_RGB) in verdict_banner(3, 0)
    assert "FAILED: 1 of 3" in verdict_banner(2, 1) and str(FAILED_RGB) in verdict_banner(2, 1)
    assert "No gates" in verdict_banner(0, 0)


def test_a_junit_path_that_cannot_be_written_is_refused_before_the_build(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[data]\nroot = "nowhere"\n')
    res = runner.invoke(app, ["run", str(recipe), "--junit", str(blocker / "gates.xml")])
    assert res.exit_code == 2
    assert "--junit" in res.output and "cannot create its folder" in res.output
