"""register: the pipeline's MLflow run completed (metrics, reports, the registered ONNX) and finished."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib import metadata

from headstart import HeadstartError
from headstart.atomic import write_json
from headstart.config import Params
from headstart.runtime import EXPORT_FILES
from tasks import _inputs


@dataclass
class RegisterResult:
    run_id: str
    model_name: str
    model_version: str
    model_uri: str
    tracking_uri: str
    experiment_id: str


def register(cfg: Params, tags: dict[str, str] | None = None) -> RegisterResult:
    from headstart.tracking import finish_run, log_curves, log_pipeline_run

    parity = _inputs.read_json(cfg, "export", "parity.json")
    if not parity.get("passed"):
        raise HeadstartError("export parity did not pass; refusing to register the model")
    prepare = _inputs.read_json(cfg, "prepare", "report.json")
    validation = _inputs.read_json(cfg, "validate", "report.json")
    domain = _inputs.read_json(cfg, "domain", "report.json")
    train = _inputs.read_json(cfg, "train_head", "metrics.json")
    tune = _inputs.read_json(cfg, "finetune", "decision.json")
    test = _inputs.read_json(cfg, "evaluate", "metrics.json")
    metrics = {
        "n_files": prepare["n_files"],
        "n_images": validation["n_images"],
        "n_quarantined": validation["n_quarantined"],
        "validate.n_warnings": len(validation["warnings"]),
        **({"domain.score": domain["score"]} if domain["score"] is not None else {}),
        **{f"train_head.{k}": v for k, v in train.items() if isinstance(v, int | float)},
        **{
            f"finetune.{k}": v
            for k, v in tune.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        **{f"test_recall.{c}": v["recall"] for c, v in test["per_class"].items()},
        "export.max_abs_logit_diff": parity["max_abs_logit_diff"],
        "export.top1_agreement": parity["top1_agreement"],
    }
    all_tags = {
        "data_hash": prepare["data_hash"],
        "git_commit": _git_commit(),
        "backbone": cfg.train_head.backbone,
        "domain.verdict": domain["verdict"],
        "validate.success": str(validation["success"]).lower(),
        "export.parity_passed": str(parity["passed"]).lower(),
        "export.variants": ",".join(parity["registered"]),
        "finetune.finetuned": str(tune["finetuned"]).lower(),
        "finetune.reason": tune["reason"],
        **(tags or {}),
    }
    root = cfg.project.artifacts_dir
    artifacts = _stage_artifacts(cfg)
    artifacts["export"] = root / "export" / "parity.json"
    ids = log_pipeline_run(
        cfg,
        metrics,
        artifacts,
        root / "export" / EXPORT_FILES["fp32"],
        all_tags,
        _runtime_requirements(),
        [root / "export" / EXPORT_FILES[v] for v in parity["registered"] if v != "fp32"],
    )
    head = _inputs.read_json(cfg, "train_head", "history.json")
    tuned = _inputs.read_json(cfg, "finetune", "history.json")
    log_curves(cfg, ids["run_id"], [(head, 0), (tuned, len(head))])  # what was not logged live
    write_json(cfg.stage_dir("register") / "run.json", ids)
    finish_run(cfg, ids["run_id"])  # last: until here a retry reuses the run and its version
    return RegisterResult(**ids)


def open_run(cfg: Params, tags: dict[str, str] | None = None, started: float | None = None) -> str:
    """A new MLflow run for this pipeline execution, started at `started` (the flow's start): later
    stages log to it, register finishes it."""
    from headstart.tracking import pipeline_run

    return pipeline_run(cfg, tags=tags, fresh=True, started=started)


def record_failure(cfg: Params, stage: str, error: str, tags: dict[str, str] | None = None) -> str:
    """An MLflow run marked FAILED: the failing stage, the error, and the reports written so far."""
    from headstart.tracking import log_failed_run

    all_tags = {"git_commit": _git_commit(), "backbone": cfg.train_head.backbone, **(tags or {})}
    return log_failed_run(cfg, stage, error, _stage_artifacts(cfg), all_tags)


def _stage_artifacts(cfg: Params) -> dict:
    """Each finished stage's folder (reports, plots, the head's model.pt); the ONNX is logged as the model."""
    root = cfg.project.artifacts_dir
    return {
        stage: root / stage
        for stage in ("prepare", "validate", "domain", "train_head", "finetune", "evaluate")
        if (root / stage).is_dir()
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def _runtime_requirements() -> list[str]:
    """What serving the ONNX model needs (headstart.runtime): pinned to what produced it."""
    return [f"{name}=={metadata.version(name)}" for name in ("onnxruntime-gpu", "numpy", "pillow")]
