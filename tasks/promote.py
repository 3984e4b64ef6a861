"""promote: the newly registered version becomes `champion` only on evidence. Gates first (validation,
domain verdict, export parity, a test-metric floor), then a paired comparison with the current
champion on the same test images through onnxruntime. Aliases: `champion`, `previous` (the one it
replaced, for rollback), `challenger` (a version that was not promoted)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from headstart import HeadstartError
from headstart.atomic import directory, write_json, write_text
from headstart.config import Params
from headstart.metrics import classification_metrics
from headstart.promotion import decide, mcnemar, paired_bootstrap, to_markdown
from tasks import _inputs


@dataclass
class PromoteResult:
    promoted: bool
    model_name: str
    version: str
    champion: str | None
    reason: str


def gates(cfg: Params, run) -> dict[str, dict]:
    """Each gate from what the version's own MLflow run recorded."""
    p = cfg.promote
    tags, metrics = run.data.tags, run.data.metrics
    verdict = tags.get("domain.verdict", "not recorded")
    accuracy = metrics.get("test_accuracy")
    return {
        "validation": {
            "passed": tags.get("validate.success") == "true",
            "detail": f"validate.success={tags.get('validate.success', 'not recorded')}",
        },
        "domain": {
            "passed": verdict in p.allowed_verdicts,
            "detail": f"verdict {verdict}; allowed {', '.join(p.allowed_verdicts)}",
        },
        "export_parity": {
            "passed": tags.get("export.parity_passed") == "true",
            "detail": f"export.parity_passed={tags.get('export.parity_passed', 'not recorded')}",
        },
        "test_metric": {
            "passed": accuracy is not None and accuracy >= p.min_test_accuracy,
            "detail": f"test accuracy {accuracy if accuracy is None else round(accuracy, 4)} "
            f"(floor {p.min_test_accuracy})",
        },
    }


def _predictions(cfg: Params, uri: str, paths) -> tuple[list[str], np.ndarray]:
    from headstart.runtime import Predictor
    from headstart.tracking import downloaded_model

    with downloaded_model(uri, cfg) as onnx_file:
        predictor = Predictor(onnx_file, providers="cpu", warmup=False)
        return predictor.classes, predictor.predict(paths).argmax(1)


def promote(cfg: Params, version: str | None = None, model_name: str | None = None) -> PromoteResult:
    from headstart.tracking import Registry

    p = cfg.promote
    name = model_name or cfg.register.model_name
    registry = Registry(cfg, name)
    if version is None:
        run_json = cfg.stage_dir("register") / "run.json"
        recorded = json.loads(run_json.read_text()) if run_json.exists() else {}
        version = recorded["model_version"] if recorded.get("model_name") == name else registry.latest()
    version = str(version)
    mv = registry.version(version)
    run = registry.run(mv.run_id)
    champion = registry.alias("champion")
    checks = gates(cfg, run)
    decision: dict = {"model_name": name, "version": version, "champion_version": champion, "gates": checks}
    comparison = None
    if champion == version:
        promoted, reason = True, f"v{version} already holds alias champion"
    else:
        note = ""
        if champion is not None and all(g["passed"] for g in checks.values()):
            comparison, note = _compare(cfg, name, version, champion, decision)
        promoted, reason = decide(checks, comparison, p.margin, note)
    decision.update(promoted=promoted, reason=reason, comparison=comparison, margin=p.margin)
    tags = {
        "promotion.decision": "champion" if promoted else "challenger",
        "promotion.reason": reason,
        "promotion.champion_before": champion or "none",
        "promotion.gates": json.dumps({k: g["passed"] for k, g in checks.items()}),
        **(
            {
                "promotion.ci_low": f"{comparison['ci_low']:.4f}",
                "promotion.ci_high": f"{comparison['ci_high']:.4f}",
                "promotion.difference": f"{comparison['difference']:.4f}",
                "promotion.mcnemar_p": f"{decision['mcnemar']['p_value']:.4g}",
            }
            if comparison
            else {}
        ),
    }
    markdown = to_markdown(decision)
    with directory(cfg.stage_dir("promote")) as out:
        write_json(out / "decision.json", decision)
        write_text(out / "summary.md", markdown)
    # the registry changes last, each a single call: a crash between them leaves exactly one champion
    registry.tag(version, tags)
    registry.log_text(mv.run_id, markdown, "promote/comparison.md")
    if promoted and champion != version:
        if champion is not None:
            registry.set_alias("previous", champion)
        registry.set_alias("champion", version)
        if registry.alias("challenger") == version:
            registry.delete_alias("challenger")
    elif not promoted:
        registry.set_alias("challenger", version)
    return PromoteResult(promoted, name, version, registry.alias("champion"), reason)


def _compare(cfg: Params, name: str, version: str, champion: str, decision: dict) -> tuple[dict | None, str]:
    """Both versions predict the current test split through onnxruntime; (comparison, why not)."""
    rows, paths = _inputs.split_paths(cfg, _inputs.manifest(cfg), "test")
    if rows.empty:
        return None, "cannot compare: the test split is empty"
    try:
        new_classes, new_pred = _predictions(cfg, f"models:/{name}/{version}", paths)
        old_classes, old_pred = _predictions(cfg, f"models:/{name}/{champion}", paths)
    except HeadstartError as exc:
        return None, f"cannot compare with champion v{champion}: {exc}"
    if sorted(new_classes) != sorted(old_classes):
        return None, (
            f"cannot compare: champion v{champion} predicts {old_classes}, v{version} predicts {new_classes}"
        )
    classes = new_classes
    old_pred = np.array([classes.index(old_classes[i]) for i in old_pred])  # same names, any order
    y = rows["label"].map(classes.index).to_numpy()
    p = cfg.promote
    comparison = paired_bootstrap(y, new_pred, old_pred, p.n_bootstrap, p.confidence, cfg.project.seed)
    decision["mcnemar"] = mcnemar(y, new_pred, old_pred)
    decision["models"] = {
        f"v{version} (new)": {**classification_metrics(y, new_pred, classes), "classes": classes},
        f"v{champion} (champion)": {**classification_metrics(y, old_pred, classes), "classes": classes},
    }
    return comparison, ""


def rollback(cfg: Params, model_name: str | None = None) -> PromoteResult:
    """`champion` back to the version holding `previous`; the demoted one becomes `previous`."""
    from headstart.tracking import Registry

    name = model_name or cfg.register.model_name
    registry = Registry(cfg, name)
    previous, current = registry.alias("previous"), registry.alias("champion")
    if previous is None:
        raise HeadstartError(f"{name}: no version holds alias previous; nothing to roll back to")
    registry.tag(previous, {"promotion.rollback_from": current or "none"})
    registry.set_alias("champion", previous)
    if current is not None:
        registry.set_alias("previous", current)
    reason = f"rolled back: champion v{current} -> v{previous}"
    return PromoteResult(True, name, previous, previous, reason)
