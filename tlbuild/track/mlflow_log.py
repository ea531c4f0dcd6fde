"""Log a BuildRecord to an MLflow tracking server: one run per build, and optionally a model
version in the registry. `mlflow` is imported here only (the mlflow extra)."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tlbuild.artifacts import MODEL_ONNX
from tlbuild.manifest import MANIFEST_JSON
from tlbuild.track.record import BuildRecord

# MLflow's batch limits (log_batch): at most 1000 metrics and 100 params per call.
_METRICS_PER_CALL, _PARAMS_PER_CALL = 1000, 100


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at an http(s) tracking URI (refused, no such host, timed out), or
    None. Any HTTP answer, or a TLS question, is left to MLflow's client: it knows the
    certificates and credentials MLflow's settings name. Other URIs are opened by MLflow."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:  # a server answered (an auth proxy's 401 too)
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return None
        return f"no MLflow server answers at {uri} ({e.reason})"
    except (TimeoutError, OSError) as e:
        return f"no MLflow server answers at {uri} ({e})"


def transient(error: BaseException) -> bool:
    """Whether an error from MLflow's client is the server being away (worth trying at the next
    build) rather than a setting to fix (a deleted experiment, no permission, a bad name)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError):
            return True
        if type(seen).__name__ in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"):
            return True  # requests' own, without importing it
        code = getattr(seen, "error_code", "")
        if code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"):
            return True
        if "Max retries exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _register(client: Any, name: str, run_id: str) -> str:
    """A new version of registered model `name` from the run's model/ folder; its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return str(mv.version)


def log_build(
    uri: str,
    experiment: str,
    record: BuildRecord,
    run_name: str,
    out: Path,
    register: str | None = None,
) -> dict[str, str]:
    """One MLflow run holding `record` (and, with `register`, a registered model version of the
    folder's model.onnx and manifest); its ids and address."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {**record.tags, "mlflow.runName": run_name}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in sorted(record.params.items())]
        for part in _chunks(params, _PARAMS_PER_CALL):
            client.log_batch(run_id, params=part)
        now = int(run.info.start_time)
        metrics = [Metric(k, v, now, 0) for k, v in sorted(record.metrics.items())]
        for epoch, values in record.history:
            metrics += [Metric(f"history.{k}", v, now, epoch) for k, v in values.items()]
        for part in _chunks(metrics, _METRICS_PER_CALL):
            client.log_batch(run_id, metrics=part)
        for path in record.files:
            client.log_artifact(run_id, str(path))
        version = ""
        if register:
            for name in (MODEL_ONNX, MANIFEST_JSON, "labels.json"):
                if (out / name).is_file():
                    client.log_artifact(run_id, str(out / name), artifact_path="model")
            version = _register(client, register, run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return {
        "tracking_uri": uri,
        "experiment": experiment,
        "experiment_id": str(experiment_id),
        "run_id": run_id,
        "url": f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}",
        "registered": f"{register} version {version}" if register else "",
    }
