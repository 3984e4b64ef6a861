"""MLflow: one run per pipeline execution with everything it produced; the ONNX model registered."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headstart import HeadstartError
from headstart.config import Params, flatten


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri


def log_pipeline_run(
    params: Params,
    metrics: dict[str, float],
    artifacts: dict[str, Path],
    onnx_path: Path,
    tags: dict[str, str],
    pip_requirements: list[str],
    curves: list[tuple[str, float, int]] = (),
) -> dict[str, str]:
    """Log params, metrics, (key, value, step) curves, tags and artifacts, register the ONNX model;
    returns ids and the version."""
    uri = tracking_uri(params)
    with _using(uri):
        return _log(params, metrics, artifacts, onnx_path, tags, pip_requirements, uri, curves)


@contextmanager
def _using(uri: str) -> Iterator[None]:
    """Point MLflow at `uri` for this call only: set_tracking_uri also exports MLFLOW_TRACKING_URI,
    which would otherwise override params.yaml for every later run and child process (dvc)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _log(params, metrics, artifacts, onnx_path, tags, pip_requirements, uri, curves) -> dict[str, str]:
    import time

    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.entities import Metric

    exp_id = _experiment(params, uri)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params(flatten(params))
        mlflow.log_metrics(metrics)
        now = int(time.time() * 1000)
        history = [Metric(f"curve.{k}", v, now, step) for k, v, step in curves]
        for i in range(0, len(history), 1000):  # MLflow's batch limit
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=history[i : i + 1000])
        mlflow.set_tags(tags)
        _log_artifacts(artifacts)
        info = mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="model",
            registered_model_name=params.register.model_name,
            pip_requirements=pip_requirements,
        )
    return {
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "run_id": run.info.run_id,
        "model_name": params.register.model_name,
        "model_version": str(info.registered_model_version),
        "model_uri": f"models:/{params.register.model_name}/{info.registered_model_version}",
    }


def _experiment(params: Params, uri: str) -> str:
    import mlflow

    try:
        exp = mlflow.get_experiment_by_name(params.mlflow.experiment)
        if exp:
            return exp.experiment_id
        return mlflow.create_experiment(
            params.mlflow.experiment, artifact_location=params.mlflow.artifact_location.resolve().as_uri()
        )
    except Exception as exc:
        raise HeadstartError(f"MLflow tracking store {uri} is not usable: {exc}") from None


def _log_artifacts(artifacts: dict[str, Path]) -> None:
    import mlflow

    for dest, path in artifacts.items():
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=dest)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=dest)


def log_failed_run(
    params: Params, stage: str, error: str, artifacts: dict[str, Path], tags: dict[str, str]
) -> str:
    """A run marked FAILED that says which stage failed and why, with the reports it left."""
    import mlflow

    uri = tracking_uri(params)
    with _using(uri):
        exp_id = _experiment(params, uri)
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_params(flatten(params))
            mlflow.set_tags({**tags, "failed_stage": stage, "error": error[:5000]})
            _log_artifacts(artifacts)
            mlflow.end_run(status="FAILED")
        return run.info.run_id
