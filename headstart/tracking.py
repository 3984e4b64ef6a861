"""MLflow: one run per pipeline execution, opened at its start, curves logged live, the ONNX registered.

Retries live in one place, the Prefect flow (schedule.retries): this module classifies MLflow's errors
by their error_code into TransientError (server down or failing: retried) and HeadstartError (the
rest), and register is idempotent, so a retried stage never makes a second model version."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from headstart import HeadstartError, TransientError
from headstart.atomic import write_json
from headstart.config import Params, flatten
from headstart.metrics import ci_metrics

# The flow's retries are the one retry layer; MLflow's own HTTP retries would multiply them (and by
# default retry an unreachable server for minutes per call). Users may still set them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

# error codes of a server that is down, overloaded or failing (HTTP 5xx, 429); MLflow gives an
# unreachable server's connection error INTERNAL_ERROR
TRANSIENT_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
    }
)
# MLflow reports a missing alias as INVALID_PARAMETER_VALUE, a missing model or run as RESOURCE_DOES_NOT_EXIST
MISSING_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})

log = logging.getLogger(__name__)


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri


def check_store(params: Params, timeout_s: float = 5.0) -> str:
    """Refuse, before any work, a tracking store that cannot take this run: a server that does not
    answer /health, a sqlite file that is read-only, corrupted or in a missing folder. Returns the URI.
    Imports no mlflow, so it costs milliseconds."""
    uri = tracking_uri(params)
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri.removeprefix("sqlite:///").split("?")[0]), uri)
    return uri


def _check_server(uri: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
            r.read(64)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise HeadstartError(
            f"MLflow tracking server {uri} does not answer ({why}); start it (headstart server start) "
            "or set mlflow.tracking_uri / MLFLOW_TRACKING_URI to one that runs"
        ) from None


def _check_sqlite(db: Path, uri: str) -> None:
    import sqlite3

    where = db.parent if str(db.parent) else Path(".")
    if not where.is_dir():
        raise HeadstartError(f"MLflow store {uri}: folder {where} does not exist; create it or fix the URI")
    # the mode bits too: root may write anything, but a file marked read-only is meant to stay so
    if not os.access(where, os.W_OK) or (
        db.exists() and (not os.access(db, os.R_OK | os.W_OK) or not db.stat().st_mode & 0o200)
    ):
        raise HeadstartError(
            f"MLflow store {db} (or its folder) is read-only; make it writable or set mlflow.tracking_uri"
        )
    if not db.exists():
        return
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        raise HeadstartError(
            f"MLflow store {db} cannot be opened as a database ({exc}); restore it from a backup or "
            "move it away to start a new one"
        ) from None


def classify(exc: BaseException, what: str, uri: str) -> BaseException:
    """MLflow's failure as TransientError (retry may help) or HeadstartError (it will not), by error
    code; anything MLflow did not raise (a bug) is returned as it is, to keep its traceback."""
    import requests
    from mlflow.exceptions import MlflowException

    text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout) or (
        isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_CODES
    ):
        return TransientError(f"MLflow {uri} unreachable or failing ({what}): {text}")
    if isinstance(exc, MlflowException):
        return HeadstartError(f"MLflow {uri}: {what}: {text}")
    if type(exc).__module__.startswith(("sqlalchemy", "sqlite3")):  # a read-only or damaged store file
        return HeadstartError(f"MLflow store {uri}: {what}: {text}; check the file (permissions, a backup)")
    return exc


@contextmanager
def _classified(what: str, uri: str) -> Iterator[None]:
    try:
        yield
    except HeadstartError:
        raise
    except Exception as exc:
        raise classify(exc, what, uri) from exc


def _call(uri: str, what: str, fn, *args, missing_ok: bool = False, exists_ok: bool = False, **kwargs):
    """fn(*args, **kwargs), once; None when missing_ok and MLflow says the thing does not exist, or
    exists_ok and it already exists."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        if (missing_ok and exc.error_code in MISSING_CODES) or (
            exists_ok and exc.error_code == "RESOURCE_ALREADY_EXISTS"
        ):
            return None
        raise classify(exc, what, uri) from exc
    except Exception as exc:
        raise classify(exc, what, uri) from exc


def connect(params: Params) -> None:
    """Open the tracking store once: the first client in a process pays MLflow's import and, on a
    database, its schema check; the later ones (every stage that logs) do not."""
    _client(tracking_uri(params))


def _client(uri: str):
    import mlflow

    with _classified("open the store", uri):  # a damaged or read-only store fails here
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _using(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for this call only: set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which would otherwise override params.yaml for every later run and child
    process (dvc)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


# --- the pipeline execution's run -------------------------------------------------------------


def run_file(params: Params) -> Path:
    """Where the pipeline run's id travels between stages (under DVC each stage is its own process)."""
    return params.project.artifacts_dir / "run" / "mlflow.json"


def pipeline_run(
    params: Params, tags: dict[str, str] | None = None, fresh: bool = False, started: float | None = None
) -> str:
    """The id of this pipeline execution's MLflow run: the one recorded in run_file(params) while it
    is still RUNNING with the same params (a retried or resumed stage continues it), else a new
    RUNNING run with the params logged, starting at `started` (epoch seconds; default now).
    `fresh` (a new flow run) always opens a new one; a recorded run left RUNNING is marked KILLED."""
    uri = tracking_uri(params)
    client, digest = _client(uri), _params_digest(params)
    with _classified("pipeline run", uri):
        recorded = _recorded_run(client, params, uri)
        if recorded is not None and recorded.info.status == "RUNNING":
            if not fresh and recorded.data.tags.get("headstart.params_sha256") == digest:
                if tags:
                    client.log_batch(recorded.info.run_id, tags=_tags(tags))
                return recorded.info.run_id
            client.set_terminated(recorded.info.run_id, "KILLED")
        exp_id = _experiment(client, params, uri)
        start = int((started or time.time()) * 1000)
        given = {**(tags or {}), "headstart.params_sha256": digest}
        run = client.create_run(exp_id, start_time=start, tags={t.key: t.value for t in _tags(given)})
        _log_params(client, run.info.run_id, params)
    write_json(
        run_file(params),
        {
            "run_id": run.info.run_id,
            "tracking_uri": uri,
            "experiment_id": exp_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start / 1000)),
        },
    )
    return run.info.run_id


def _recorded_run(client, params: Params, uri: str):
    """The run named by run_file(params) if it is in this store and not deleted, else None."""
    record = _read_record(run_file(params))
    if record.get("tracking_uri") != uri:
        return None
    run = _call(uri, "get run", client.get_run, record["run_id"], missing_ok=True)
    return run if run is not None and run.info.lifecycle_stage == "active" else None


def _read_record(path: Path) -> dict:
    """run_file's record, or {} when there is none; a damaged one (truncated, not JSON, the wrong
    shape) is a cache gone bad: {} with a warning, and a new run is opened."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        record = f"{type(exc).__name__}: {str(exc)[:120]}"
    if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("run_id", "tracking_uri")):
        return record
    log.warning("%s is damaged (%s); a new MLflow run is opened", path, str(record)[:120])
    return {}


def _params_digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode()).hexdigest()


# MLflow keys allow word characters, '-', '.', ' ', ':' and '/'; ':' (Windows) and '/' (a path) and
# ' ' (unreadable at an end) are left out too
_UNSAFE = re.compile(r"[^\w\-.]+")
KEY_LIMIT = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
NAME_CHARS = 64  # a class name's share of its metric key: readable, far below KEY_LIMIT


def safe_key(name: str) -> str:
    """`name` as a valid MLflow metric, param or tag key: each run of other characters becomes '_'
    (so `cats & dogs` -> `cats_dogs`), never empty, at most KEY_LIMIT characters."""
    return _UNSAFE.sub("_", name).strip("._")[:KEY_LIMIT] or "_"


def class_keys(prefix: str, classes: list[str]) -> list[str]:
    """One key per class, `prefix.<index>_<name made safe and short>` (`test_recall.3_coffee_hot`):
    unique by the model's class index whatever the names, readable by them. The names themselves
    travel as data (classes.json, the `classes` tag), which any folder name can be."""
    safe = [_UNSAFE.sub("_", c).strip("._")[:NAME_CHARS].rstrip("._") for c in classes]
    return [f"{prefix}.{i}_{s}" if s else f"{prefix}.{i}" for i, s in enumerate(safe)]


def _unique(keys: list[str]) -> list[str]:
    """Safe keys, a repeat (two user keys made safe alike) suffixed with its position."""
    out, seen = [], set()
    for i, k in enumerate(keys):
        k = safe_key(k)
        k = k if k not in seen else f"{k[: KEY_LIMIT - 8]}_{i}"
        seen.add(k)
        out.append(k)
    return out


def _text(value, limit: int | None = None) -> str:
    """A value MLflow can store: a name's undecodable bytes (lone surrogates) escaped as `\\udcff`,
    which inside JSON text reads back as the same name."""
    return str(value).encode("utf-8", "backslashreplace").decode()[:limit]


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, _text(v, 5000)) for k, v in zip(_unique(list(tags)), tags.values(), strict=True)]


def _log_params(client, run_id: str, params: Params) -> None:
    from mlflow.entities import Param

    values = flatten(params)  # keys under schedule.timeout_s are the user's: made safe, kept distinct
    flat = [Param(k, _text(v, 6000)) for k, v in zip(_unique(list(values)), values.values(), strict=True)]
    for i in range(0, len(flat), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=flat[i : i + 100])


def _experiment(client, params: Params, uri: str) -> str:
    exp = _call(uri, "get experiment", client.get_experiment_by_name, params.mlflow.experiment)
    if exp:
        return exp.experiment_id
    location = params.mlflow.artifact_location.resolve().as_uri()
    name = params.mlflow.experiment
    made = _call(uri, "create experiment", client.create_experiment, name, location, exists_ok=True)
    # None: another project's run, sharing the tracking server, created it since the lookup
    return made or _call(uri, "get experiment", client.get_experiment_by_name, name).experiment_id


def finish_run(params: Params, run_id: str, status: str = "FINISHED") -> None:
    """End the pipeline run, so the next pipeline execution opens a new one."""
    uri = tracking_uri(params)
    _call(uri, f"end run {run_id}", _client(uri).set_terminated, run_id, status)


def curve_logger(
    params: Params, phase: str, offset: int = 0, prefix: str = "curve"
) -> Callable[[dict], None]:
    """An `on_epoch` callback for the fit loops: each epoch's row goes to the pipeline run as
    <prefix>.<key> at step offset + epoch while training runs (another model: another prefix). A
    tracking outage never costs a training run: the first failure is a warning and the phase stops
    sending (register logs any missing steps from history.json)."""
    state: dict = {"run": None, "off": False}

    def on_epoch(row: dict) -> None:
        if state["off"]:
            return
        try:
            if state["run"] is None:
                state["run"] = pipeline_run(params)
            _log_curves(params, state["run"], [row], offset, prefix=prefix)
        except Exception as exc:
            state["off"] = True
            log.warning("%s: learning curves not sent to MLflow (%s); register logs them later", phase, exc)

    return on_epoch


def _log_curves(
    params: Params,
    run_id: str,
    history: list[dict],
    offset: int,
    skip: dict | None = None,
    prefix: str = "curve",
):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [
        Metric(f"{prefix}.{k}", float(v), now, offset + row["epoch"])
        for row in history
        for k, v in row.items()
        if k != "epoch"
        and isinstance(v, int | float)
        and offset + row["epoch"] not in (skip or {}).get(k, ())
    ]
    uri = tracking_uri(params)
    for i in range(0, len(rows), 1000):  # MLflow's batch limit for metrics
        _call(uri, "log curves", _client(uri).log_batch, run_id, metrics=rows[i : i + 1000])


def log_curves(
    params: Params, run_id: str, phases: list[tuple[list[dict], int]], prefix: str = "curve"
) -> None:
    """Each (history, offset) phase's curves, except the steps the run already has (logged live)."""
    uri = tracking_uri(params)
    client = _client(uri)
    for history, offset in phases:
        keys = {k for row in history for k in row if k != "epoch"}
        have = {
            k: {
                m.step
                for m in _call(uri, "curve history", client.get_metric_history, run_id, f"{prefix}.{k}")
            }
            for k in keys
        }
        _log_curves(params, run_id, history, offset, have, prefix)


# --- register -----------------------------------------------------------------------------------


def pipeline_record(
    reports: dict[str, dict], backbone: str, classes: list[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a pipeline run from its stages' reports (prepare and validate report.json,
    domain report.json, train_head metrics.json, finetune decision.json, evaluate metrics.json,
    export parity.json) and the model's `classes` in its output order: what the run, its registered
    version and promotion's gates read."""
    prep, val, dom, train, tune, test, parity = (
        reports[k] for k in ("prepare", "validate", "domain", "train_head", "finetune", "evaluate", "export")
    )
    names, recall_keys = json.dumps(classes, ensure_ascii=False), class_keys("test_recall", classes)
    metrics = {
        "n_files": prep["n_files"],
        "n_images": val["n_images"],
        "n_quarantined": val["n_quarantined"],
        "validate.n_warnings": len(val["warnings"]),
        **({"domain.score": dom["score"]} if dom["score"] is not None else {}),
        **{f"train_head.{k}": v for k, v in train.items() if isinstance(v, int | float)},
        **{
            f"finetune.{k}": v
            for k, v in tune.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        "test_accuracy": test["accuracy"],
        **ci_metrics({"accuracy_ci": test.get("accuracy_ci")}, "test_"),  # test_accuracy_ci_low / _high
        **_estimate_metrics(test),
        "test_macro_f1": test["macro_f1"],
        **{k: test["per_class"][c]["recall"] for k, c in zip(recall_keys, classes, strict=True)},
        "export.max_abs_logit_diff": parity["max_abs_logit_diff"],
        "export.top1_agreement": parity["top1_agreement"],
    }
    tags = {
        "data_hash": prep["data_hash"],
        "backbone": backbone,
        "domain.verdict": dom["verdict"],
        "validate.success": str(val["success"]).lower(),
        "export.parity_passed": str(parity["passed"]).lower(),
        "export.variants": ",".join(parity["registered"]),
        "finetune.finetuned": str(tune["finetuned"]).lower(),
        "finetune.reason": tune["reason"],
        "classes": names if len(names) <= 5000 else f"{len(classes)} classes: see classes.json",
        # the head's settings as the search chose them (every trial: train_head/search.json)
        **{f"train_head.chosen.{k}": str(v) for k, v in train.get("settings", {}).items()},
    }
    if signal := test.get("signal"):  # the "learned something" test and the estimate it judged
        tags |= {"evaluate.estimate": test["estimate"], "evaluate.signal": str(signal["passed"]).lower()}
        tags["evaluate.signal_line"] = signal["line"]
    if sel := reports.get("select"):
        tags |= {"select.chosen": sel["chosen"], "select.kind": sel["kind"], "select.reason": sel["reason"]}
        for c in sel["candidates"]:  # what selection weighed, each with its CI
            metrics |= {
                f"select.{c['name']}.val_accuracy": c["val_accuracy"],
                **ci_metrics(c, f"select.{c['name']}."),
            }
    if scr := reports.get("scratch"):
        tags |= {"scratch.trained": str(scr["ran"]).lower(), "scratch.reason": scr["reason"]}
    if choice := reports.get("backbone"):  # the backbone stage's decision (its file is an artifact)
        tags |= {"backbone.how": choice["how"], "backbone.reason": choice["reason"][:5000]}
        metrics |= {
            f"backbone.{c['name']}.{k}": c[k]
            for c in choice["candidates"]
            for k in ("logme", "cv_accuracy")
            if c.get(k) is not None
        }
    gain_metrics, gain_tags = transfer_gain_record(test.get("transfer_gain"))
    return {**metrics, **gain_metrics}, {**tags, **gain_tags}


def _estimate_metrics(test: dict) -> dict[str, float]:
    """The accuracy the gates use (`estimate_accuracy`, with its CI) and each estimate evaluate made
    (`held_out_accuracy`: calibrate's out-of-fold or validation-split one), with its n."""
    if "estimate_accuracy" not in test:
        return {}
    out = {"estimate_accuracy": test["estimate_accuracy"]}
    out |= ci_metrics({"estimate_accuracy_ci": test["estimate_accuracy_ci"]})
    if held := test["estimates"].get("held_out"):
        out |= {"held_out_accuracy": held["accuracy"], "held_out_n": held["n"]}
        out |= ci_metrics({"held_out_accuracy_ci": held["accuracy_ci"]})
    return out


def transfer_gain_record(gain: dict | None) -> tuple[dict[str, float], dict[str, str]]:
    """evaluate's transfer_gain as transfer_gain.* metrics and tags (or why it was not measured)."""
    if not gain or not gain.get("measured"):
        return {}, {
            "transfer_gain.measured": "false",
            "transfer_gain.why_not": (gain or {}).get("why_not", ""),
        }
    t, s = gain["transfer"], gain["scratch"]
    metrics = {
        f"transfer_gain.{k}": gain[k] for k in ("difference", "ci_low", "ci_high", "confidence", "n_images")
    }
    metrics["transfer_gain.mcnemar_p"] = gain["mcnemar"]["p_value"]
    for name, c in (("transfer", t), ("scratch", s)):
        metrics |= {f"transfer_gain.{name}_{k}": c[k] for k in ("test_accuracy", "wall_s", "parameters")}
    return metrics, {"transfer_gain.measured": "true", "transfer_gain.transfer_kind": t["kind"]}


def classes_record(classes: list[str]) -> list[dict]:
    """classes.json, the run's artifact: each class's index (the model's output), exact name and
    metric key, so a `test_recall.<index>_...` key leads back to its folder name."""
    keys = class_keys("test_recall", classes)
    return [
        {"index": i, "name": c, "test_recall": k} for i, (c, k) in enumerate(zip(classes, keys, strict=True))
    ]


def onnx_classes(path: Path) -> list[str]:
    """The class names in output order, from the exported model's own metadata (the served contract)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(meta["headstart.classes"])


def log_pipeline_run(
    params: Params,
    metrics: dict[str, float],
    artifacts: dict[str, Path],
    onnx_path: Path,
    tags: dict[str, str],
    pip_requirements: list[str],
    variants: list[Path] = (),
    classes: list[str] | None = None,
    serving: dict | None = None,
    force: bool = False,
) -> dict:
    """Log metrics, tags and artifacts (with `classes` as classes.json) to the pipeline run and
    register its ONNX model as headstart.serving's image-in pyfunc (the fp32 file and the other
    exported variants, e.g. model_fp16.onnx, as its artifacts; `serving`: its model_config, e.g.
    register.serving's max_images); returns ids and the version. A model equal to the latest
    version's (its files and serving config: MODEL_DIGEST) is not registered again unless `force`:
    then the version is that one, "registered" is False and "reason" says why.
    Idempotent: a retried or rerun register of the same run finds the version it made and returns
    it. The run stays RUNNING until finish_run."""
    from mlflow.entities import Metric

    uri, name = tracking_uri(params), params.register.model_name
    client, run_id = _client(uri), pipeline_run(params)
    with _classified("register", uri):
        version, same = _version_of(client, name, run_id, uri), None
        if version is None:
            now = int(time.time() * 1000)
            scalars = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
            client.log_batch(run_id, metrics=scalars, tags=_tags(tags))
            _log_artifacts(client, run_id, artifacts)
            if classes is not None:
                text = json.dumps(classes_record(classes), indent=2, ensure_ascii=False)
                client.log_text(run_id, _text(text), "classes.json")
            files = (onnx_path, variants, serving)
            digest = model_digest(onnx_path, variants, serving)
            same = None if force else _latest_if_same(client, name, digest, uri)
            if same is None:
                version = _register(client, params, run_id, files, pip_requirements, uri, digest)
            else:
                version = same
                client.set_tag(
                    run_id, "registered", f"no: the same model as v{same} ({MODEL_DIGEST} {digest})"
                )
        exp_id = client.get_run(run_id).info.experiment_id
    return {
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "run_id": run_id,
        "model_name": name,
        "model_version": version,
        "model_uri": f"models:/{name}/{version}",
        "registered": same is None,
        "reason": "" if same is None else f"the same model as v{same}: not registered again (--force does)",
    }


MODEL_DIGEST = "headstart.model_sha256"  # a version's tag: what register compares a new model with


def model_digest(onnx_path: Path, variants, serving: dict | None) -> str:
    """sha256 of what a version serves: each ONNX file's bytes under its name, and the serving config."""
    digest = hashlib.sha256(json.dumps(serving or {}, sort_keys=True, default=str).encode())
    for path in sorted([Path(onnx_path), *map(Path, variants)], key=lambda p: p.name):
        digest.update(f"\n{path.name}\t".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _latest_if_same(client, name: str, digest: str, uri: str) -> str | None:
    """The latest version of `name` when it carries `digest`, else None."""
    found = _call(uri, "find versions", client.search_model_versions, f"name='{name}'")
    latest = max(found or (), key=lambda v: int(v.version), default=None)
    return str(latest.version) if latest is not None and latest.tags.get(MODEL_DIGEST) == digest else None


def _version_of(client, name: str, run_id: str, uri: str) -> str | None:
    """The version of `name` that `run_id` registered, if it did."""
    found = _call(uri, "find version", client.search_model_versions, f"name='{name}' and run_id='{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def _register(client, params: Params, run_id: str, files: tuple, requirements, uri, digest: str) -> str:
    """The model is logged in full first, then one create_model_version call: a version exists
    complete or not at all, whatever fails in between."""
    name = params.register.model_name
    # a logged model made here, in the run's experiment: log_model alone would put it in the
    # active (default) experiment, as no run is active in the fluent API
    exp_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(exp_id, name="model", source_run_id=run_id)
    with _using(uri):
        info = _log_serving_model(run_id, model.model_id, *files, requirements)
        if _call(uri, "get model", client.get_registered_model, name, missing_ok=True) is None:
            # exists_ok: a run of another project naming the same model may have created it since
            _call(uri, "create model", client.create_registered_model, name, exists_ok=True)
        # inside _using: the client resolves a models:/ source through the fluent tracking URI
        made = client.create_model_version(
            name, info.model_uri, run_id=run_id, model_id=info.model_id, tags={MODEL_DIGEST: digest}
        )
    return str(made.version)


def _log_serving_model(run_id: str, model_id: str, onnx_path: Path, variants, serving, requirements):
    """The version as headstart.serving's image-in pyfunc (`mlflow models serve` takes images), its
    ONNX files as plain artifacts (artifacts/model.onnx, artifacts/model_fp16.onnx: downloadable as
    they are for onnxruntime and Triton). Model.log, not pyfunc.log_model: only it takes a run_id."""
    import tempfile
    import warnings

    import mlflow.pyfunc
    from mlflow.models import Model

    from headstart import serving as pyfunc
    from headstart.runtime import EXPORT_FILES

    files = {"fp32": Path(onnx_path), **{_variant_of(Path(v)): Path(v) for v in variants}}
    config = {**pyfunc.DEFAULTS, **(serving or {})}
    with tempfile.TemporaryDirectory(prefix="headstart-pyfunc-") as tmp:
        code = Path(tmp) / "headstart_model.py"
        code.write_text(pyfunc.MODEL_CODE, encoding="utf-8")
        files = {k: _named(v, Path(tmp) / Path(EXPORT_FILES[k]).name) for k, v in files.items()}
        with warnings.catch_warnings(), _no_requirement_scan():
            # the signature is given; an input example would make MLflow run the model at log time
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            return Model.log(
                artifact_path=None,
                name="model",
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=model_id,
                python_model=str(code),
                artifacts={k: str(v) for k, v in files.items()},
                signature=pyfunc.signature(),
                pip_requirements=list(requirements),
                model_config=config,
            )


def _no_requirement_scan():
    """MLflow checks a logged model's pip requirements against this environment, mapping every
    installed distribution's files to its modules first (~1-2 s per process, to print a warning).
    headstart's requirements are pinned from this environment (provenance.serving_requirements), so
    the check cannot fail: skipped while the model is logged. Where MLflow has no such check, nothing."""
    from contextlib import nullcontext
    from unittest import mock

    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    if not hasattr(environment, name):
        return nullcontext()
    return mock.patch.object(environment, name, lambda requirements: None)


def _named(path: Path, name: Path) -> Path:
    """`path` under the name the version's artifacts keep (MLflow keeps the file's own name)."""
    try:
        os.link(path, name)
    except OSError:  # another file system
        import shutil

        shutil.copyfile(path, name)
    return name


def _variant_of(path: Path) -> str:
    """A variant's name from its export file (variants/model_fp16.onnx -> fp16)."""
    from headstart.runtime import EXPORT_FILES

    for variant, file in EXPORT_FILES.items():
        if Path(file).name == path.name:
            return variant
    raise HeadstartError(f"{path}: not an export variant ({sorted(EXPORT_FILES.values())})")


def _log_artifacts(client, run_id: str, artifacts: dict[str, Path]) -> None:
    for dest, path in artifacts.items():
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=dest)
        elif path.exists():
            client.log_artifact(run_id, str(path), artifact_path=dest)


def log_failed_run(
    params: Params, stage: str, error: str, artifacts: dict[str, Path], tags: dict[str, str]
) -> str:
    """The pipeline run (a new one if none is open) marked FAILED, saying which stage failed and why,
    with the reports it left."""
    uri = tracking_uri(params)
    client, run_id = _client(uri), pipeline_run(params)
    with _classified("record failure", uri):
        client.log_batch(run_id, tags=_tags({**tags, "failed_stage": stage, "error": error}))
        _log_artifacts(client, run_id, artifacts)
        client.set_terminated(run_id, "FAILED")
    return run_id


def log_report(params: Params, folder: Path) -> str | None:
    """The run report's folder as the `report` artifact of the pipeline run (finished or failed: an
    artifact can join a run after it ended); None when no pipeline run is recorded in this store."""
    uri = tracking_uri(params)
    record = _read_record(run_file(params))
    if record.get("tracking_uri") != uri:
        return None
    client = _client(uri)
    with _classified("log the run report", uri):
        client.log_artifacts(record["run_id"], str(folder), artifact_path="report")
    return record["run_id"]


# --- the registry, read back ------------------------------------------------------------------


def _variant_file(variant: str) -> list[str]:
    """Where a variant may lie in a downloaded model version, newest layout first: an artifact of
    the serving pyfunc (artifacts/model.onnx, artifacts/model_fp16.onnx), else the layout of versions
    registered as mlflow.onnx models (model.onnx, extra_files/model_fp16.onnx), so a champion
    registered before still compares and serves."""
    from headstart.runtime import EXPORT_FILES

    if variant not in EXPORT_FILES:
        raise HeadstartError(f"unknown model variant {variant!r}; choose one of {sorted(EXPORT_FILES)}")
    file = Path(EXPORT_FILES[variant]).name
    return [f"artifacts/{file}", "model.onnx" if variant == "fp32" else f"extra_files/{file}"]


@contextmanager
def downloaded_model(uri: str, params: Params, variant: str = "fp32") -> Iterator[Path]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the local path of its ONNX file (`variant`
    fp32: artifacts/model.onnx; fp16: artifacts/model_fp16.onnx; see _variant_file), through the
    MLflow registry at tracking_uri(params). The download is a temporary folder, removed when the
    block ends (load the model inside it). An unreachable server raises TransientError (the flow
    retries the stage)."""
    import tempfile

    _variant_file(variant)  # an unknown variant fails before any download
    with tempfile.TemporaryDirectory(prefix="headstart-model-") as dest:
        yield _download(uri, params, variant, Path(dest))


def _download(uri: str, params: Params, variant: str, dest: Path) -> Path:
    import mlflow

    where = tracking_uri(params)
    _existing_store(where)
    with _using(where):
        local = Path(
            _call(
                where,
                f"resolve {uri}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=uri,
                dst_path=str(dest),
            )
        )
    if local.is_file():
        return local
    for file in _variant_file(variant):
        if (local / file).is_file():
            return local / file
    found = sorted(str(f.relative_to(local)) for f in local.rglob("*.onnx"))
    raise HeadstartError(
        f"{uri}: no {_variant_file(variant)[0]} in the model's artifacts (found: {found or 'none'})"
        + (f"; it was registered with export.{variant}=false or failed its gate" if variant != "fp32" else "")
    )


def _existing_store(uri: str) -> None:
    """Reading from a SQLite store that is not there would create an empty one (MLflow creates the
    file on first connect) and then report the model missing: say where the store was looked for."""
    if not uri.startswith("sqlite:"):
        return
    from sqlalchemy.engine import make_url

    db = make_url(uri).database
    if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_file():
        raise HeadstartError(
            f"no MLflow store at {uri}; set --set mlflow.tracking_uri=... or MLFLOW_TRACKING_URI"
        )


class Registry:
    """The few model-registry operations promotion needs, each called once (the flow retries the
    stage) with its failure classified: TransientError or HeadstartError naming the store."""

    def __init__(self, params: Params, name: str):
        self.uri, self.name, self.params = tracking_uri(params), name, params
        self.client = _client(self.uri)

    def _call(self, what: str, fn, *args, missing_ok: bool = False, **kwargs):
        return _call(self.uri, what, fn, *args, missing_ok=missing_ok, **kwargs)

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
                f"tag {k}", self.client.set_model_version_tag, self.name, str(version), k, _text(v, 5000)
            )

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._call("log artifact", self.client.log_text, run_id, text, path)

    def top1(self, version: str, paths: list[Path]) -> tuple[list[str], list[int]]:
        """A registered version's (classes, top-1 class index per image) through onnxruntime on the CPU."""
        from headstart.runtime import Predictor

        with downloaded_model(f"models:/{self.name}/{version}", self.params) as onnx_file:
            # 8 at a time, no arena: the same outputs as 32 at a time (onnxruntime's CPU rows do not
            # depend on the batch) at a quarter of the activations (demo flow: ~0.3 GB of its peak)
            predictor = Predictor(onnx_file, providers="cpu", warmup=False, arena=False)
            return predictor.classes, predictor.predict(paths, batch_size=8).argmax(1)

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
