"""MLflow: one run per pipeline execution with everything it produced; the ONNX model registered."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headstart import HeadstartError, TransientError
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
    variants: list[Path] = (),
) -> dict[str, str]:
    """Log params, metrics, (key, value, step) curves, tags and artifacts, register the ONNX model
    (other exported variants, e.g. model_fp16.onnx, ride in the same model version under
    extra_files/); returns ids and the version."""
    uri = tracking_uri(params)
    with _using(uri):
        return _log(params, metrics, artifacts, onnx_path, tags, pip_requirements, uri, curves, variants)


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


def _log(
    params, metrics, artifacts, onnx_path, tags, pip_requirements, uri, curves, variants
) -> dict[str, str]:
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
            extra_files=[str(v) for v in variants] or None,
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


def _variant_file(variant: str) -> str:
    """Where a variant lies in a downloaded model version: fp32 is the MLflow onnx flavour's own
    model.onnx; the others were logged as extra_files (log_pipeline_run)."""
    from headstart.runtime import EXPORT_FILES

    if variant not in EXPORT_FILES:
        raise HeadstartError(f"unknown model variant {variant!r}; choose one of {sorted(EXPORT_FILES)}")
    return "model.onnx" if variant == "fp32" else f"extra_files/{Path(EXPORT_FILES[variant]).name}"


@contextmanager
def downloaded_model(uri: str, params: Params, variant: str = "fp32") -> Iterator[Path]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the local path of its ONNX file (`variant`
    fp32: the registered model.onnx; fp16: extra_files/model_fp16.onnx), through the MLflow registry
    at tracking_uri(params); retried with backoff while the server is unreachable. The download is
    a temporary folder, removed when the block ends (load the model inside it)."""
    import tempfile

    _variant_file(variant)  # an unknown variant fails before any download
    with tempfile.TemporaryDirectory(prefix="headstart-model-") as dest:
        yield _download(uri, params, variant, Path(dest))


def _download(uri: str, params: Params, variant: str, dest: Path) -> Path:
    import time

    import mlflow

    where = tracking_uri(params)
    with _using(where):
        for attempt in range(4):
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
                break
            except Exception as exc:
                text = str(exc)
                if "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or attempt == 3:
                    raise HeadstartError(
                        f"cannot resolve {uri} in {where}: {text.splitlines()[0][:300]}"
                    ) from None
                time.sleep(0.5 * 2**attempt)
    if local.is_file():
        return local
    want = local / _variant_file(variant)
    if not want.is_file():
        found = sorted(str(f.relative_to(local)) for f in local.rglob("*.onnx"))
        raise HeadstartError(
            f"{uri}: no {want.relative_to(local)} in the model's artifacts (found: {found or 'none'})"
            + ("; it was registered with export.fp16=false" if variant == "fp16" else "")
        )
    return want


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


# MLflow's REST client retries an unreachable server for minutes by default; fail sooner, clearly
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class Registry:
    """The few model-registry operations promotion needs, each retried with backoff and turned into
    a HeadstartError naming the store when it keeps failing."""

    def __init__(self, params: Params, name: str):
        import mlflow

        self.uri, self.name = tracking_uri(params), name
        self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _call(self, what: str, fn, *args, missing_ok: bool = False, **kwargs):
        import time

        for attempt in range(3):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                text = str(exc)
                if (
                    "RESOURCE_DOES_NOT_EXIST" in text
                    or "not found" in text.lower()
                    or "INVALID_PARAMETER" in text
                ):
                    if missing_ok:
                        return None
                    raise HeadstartError(f"MLflow {self.uri}: {what}: {text.splitlines()[0][:300]}") from None
                if attempt == 2:
                    raise TransientError(
                        f"MLflow {self.uri} unreachable or failing ({what}): {text.splitlines()[0][:300]}; "
                        "nothing was changed in the registry by this step"
                    ) from None
                time.sleep(1.0 * 2**attempt)

    def alias(self, alias: str) -> str | None:
        """The version holding `alias`, or None."""
        mv = self._call(
            f"alias {alias}", self.client.get_model_version_by_alias, self.name, alias, missing_ok=True
        )
        return None if mv is None else str(mv.version)

    def version(self, version: str):
        return self._call(f"version {version}", self.client.get_model_version, self.name, str(version))

    def run(self, run_id: str):
        return self._call(f"run {run_id}", self.client.get_run, run_id)

    def latest(self) -> str:
        versions = self._call("versions", self.client.search_model_versions, f"name='{self.name}'")
        if not versions:
            raise HeadstartError(f"no registered model {self.name!r} in {self.uri}; run the pipeline first")
        return str(max(int(v.version) for v in versions))

    def set_alias(self, alias: str, version: str) -> None:
        self._call(
            f"set alias {alias}", self.client.set_registered_model_alias, self.name, alias, str(version)
        )

    def delete_alias(self, alias: str) -> None:
        self._call(
            f"delete alias {alias}",
            self.client.delete_registered_model_alias,
            self.name,
            alias,
            missing_ok=True,
        )

    def tag(self, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call(
                f"tag {k}", self.client.set_model_version_tag, self.name, str(version), k, str(v)[:5000]
            )

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._call("log artifact", self.client.log_text, run_id, text, path)

    def trained_on(self, version: str) -> frozenset[str]:
        """The sha256s `version` trained or validated on, from the validate/manifest.parquet its run
        logged (register); a version without one cannot be compared on clean evidence."""
        import tempfile

        import pandas as pd

        from headstart.promotion import seen

        run_id = self.version(version).run_id
        listed = self._call(f"artifacts of v{version}", self.client.list_artifacts, run_id, "validate")
        if "validate/manifest.parquet" not in {a.path for a in listed or ()}:
            raise HeadstartError(
                f"v{version}'s MLflow run {run_id} has no validate/manifest.parquet: what it trained on is "
                "unknown, so no image is clean evidence against it"
            )
        with tempfile.TemporaryDirectory(prefix="headstart-manifest-") as dest:
            local = self._call(
                f"download v{version}'s manifest",
                self.client.download_artifacts,
                run_id,
                "validate/manifest.parquet",
                dest,
            )
            m = pd.read_parquet(local, columns=["sha256", "split"])
        return seen(m)

    def move_aliases(self, version: str, promoted: bool, champion: str | None, best: str | None) -> None:
        """The alias protocol after a decision, one call each and `champion` before `best`, so a crash
        leaves exactly one champion: promoted -> `previous` = the old champion, `champion` = version,
        `best` = best (the best champion so far), no `challenger`; rejected -> `challenger` = version."""
        if not promoted:
            self.set_alias("challenger", version)
            return
        if champion == version:
            return
        if champion is not None:
            self.set_alias("previous", champion)
        self.set_alias("champion", version)
        if best is not None:
            self.set_alias("best", best)
        if self.alias("challenger") == version:
            self.delete_alias("challenger")

    def roll_back(self) -> tuple[str, str | None]:
        """`champion` back to the version holding `previous`, the demoted one becomes `previous`;
        `best` stays, the reference later versions must not fall behind. (new champion, demoted)."""
        previous, current = self.alias("previous"), self.alias("champion")
        if previous is None:
            raise HeadstartError(f"{self.name}: no version holds alias previous; nothing to roll back to")
        self.tag(previous, {"promotion.rollback_from": current or "none"})
        self.set_alias("champion", previous)
        if current is not None:
            self.set_alias("previous", current)
        return previous, current
