"""Builds logged to a real MLflow server (SQLite backend, started here on localhost) and read back
through MLflow's own client."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tlbuild.cli import app
from tlbuild.recipe import load_recipe
from tlbuild.runner import stage_status

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'tlbuild[mlflow]')")
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(home: Path, port: int) -> Iterator[str]:
    """`mlflow server` on localhost:`port`, its runs in SQLite, its artifacts in a folder."""
    home.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'runs.sqlite'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(home / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module's tests."""
    with _serve(tmp_path_factory.mktemp("mlflow"), _free_port()) as uri:
        yield uri


def _build(tiny_build: Path, tiny_data: Path, folder: Path, track: str) -> Path:
    """A copy of the tiny build with `track` as its [track] section, in a git repository."""
    recipe = tiny_recipe(folder, tiny_data, extra=f"[track]\n{track}\n")
    shutil.copytree(tiny_build, folder / "out" / "tiny")
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", recipe.name], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "recipe"], check=True)
    return recipe


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_build_is_one_run_with_its_recipe_metrics_history_files_and_tags(
    server: str, tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    track = f'mlflow = "{server}"\nexperiment = "tiny-logged"\nregistered_model = "tiny-model"'
    recipe = _build(tiny_build, tiny_data, tmp_path, track)
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "Logged to MLflow: run" in res.output
    (run,) = _runs(server, "tiny-logged")
    client = mlflow.tracking.MlflowClient(tracking_uri=server)
    # The resolved recipe as parameters, defaults filled in.
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.params["quantize.max_drop"] == "1.0"
    assert json.loads(run.data.params["train.phases"])[0]["name"] == "head"
    # Metrics, gates and training's history (one step per epoch).
    metrics = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())
    assert run.data.metrics["val.accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert run.data.metrics["gates.failed"] == 0
    assert "variant.int8_cpu.accuracy" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "history.val_loss")
    assert [m.step for m in history] == [0, 1]  # one head epoch, one fine-tuning epoch
    # Which code and which data.
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert run.data.tags["tlbuild.git_commit"] == head
    state = json.loads((tmp_path / "out" / "tiny" / "build_state.json").read_text())
    data = state["stages"]["train"]["inputs"]["data"]
    assert run.data.tags["tlbuild.data_fingerprint"] == data
    # The report and the manifest as artifacts; the shipped model registered with its manifest.
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "manifest.json", "gates.json", "tiny.toml"} <= files
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.onnx", "model/manifest.json"} <= model_files
    (version,) = client.search_model_versions("name='tiny-model'")
    assert version.run_id == run.info.run_id
    tracking = json.loads((tmp_path / "out" / "tiny" / "tracking.json").read_text())
    assert tracking["run_id"] == run.info.run_id

    # Nothing changed: every stage is reused, and nothing new is logged.
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "track: up to date, reused" in res.output
    assert len(_runs(server, "tiny-logged")) == 1


def test_an_unreachable_tracker_is_one_warning_and_the_next_build_logs_it(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    recipe = _build(tiny_build, tiny_data, tmp_path, f'mlflow = "{uri}"\nexperiment = "later"')
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "warning: track: no MLflow server answers at" in res.output
    assert not (tmp_path / "out" / "tiny" / "tracking.json").exists()
    (track,) = [s for s in stage_status(load_recipe(recipe)) if s.stage == "track"]
    assert track.action == "stale" and any("put off" in w for w in track.why)
    # The same recipe once the server is up: the stage was left stale, so this build logs the
    # run although nothing else changed.
    with _serve(tmp_path / "mlflow", port):
        res = runner.invoke(app, ["run", str(recipe)])
        assert res.exit_code == 0, res.output
        assert "track: up to date" not in res.output
        assert len(_runs(uri, "later")) == 1


def test_a_required_tracker_that_does_not_answer_fails_the_build(
    tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    recipe = _build(tiny_build, tiny_data, tmp_path, f'mlflow = "{closed}"\nrequired = true')
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 1
    assert "[track] required = true and no MLflow server answers at" in res.output


def test_mlflow_tracking_uri_from_the_environment(
    server: str, tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = _build(tiny_build, tiny_data, tmp_path, 'experiment = "from-env"')
    res = runner.invoke(app, ["run", str(recipe)], env={"MLFLOW_TRACKING_URI": server})
    assert res.exit_code == 0, res.output
    assert len(_runs(server, "from-env")) == 1
    # Without either, tracking is off: the build runs, nothing is logged.
    res = runner.invoke(app, ["run", str(recipe)], env={"MLFLOW_TRACKING_URI": ""})
    assert res.exit_code == 0, res.output
    assert len(_runs(server, "from-env")) == 1


def test_a_tracker_error_to_fix_fails_the_build_instead_of_waiting(
    server: str, tiny_build: Path, tiny_data: Path, tmp_path: Path
) -> None:
    # A deleted experiment would refuse the run at every build: it is said once, as an error.
    client = mlflow.tracking.MlflowClient(tracking_uri=server)
    client.delete_experiment(client.create_experiment("deleted"))
    recipe = _build(tiny_build, tiny_data, tmp_path, f'mlflow = "{server}"\nexperiment = "deleted"')
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 1
    assert f"MLflow at {server} failed" in res.output and "fix the [track] settings" in res.output
