"""The scratch and select stages on tiny RGB images, and what follows from them: the transfer gain in
evaluate, MLflow and the run summary; a selected scratch model through evaluate, export's parity
gate and `headstart predict`. (RGB data: grey export is another branch's work.)"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from headstart.config import load_params
from headstart.stages import NAMES as STAGE_NAMES
from headstart.stages import get
from tasks.calibrate import calibrate
from tasks.domain import domain
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.register import register
from tasks.scratch import scratch
from tasks.select import select
from tests.conftest import make_folder, tiny_overrides

pytestmark = pytest.mark.slow  # the pipeline to register with a scratch model: not the edit loop's

FAST = ["scratch.max_epochs=3", "scratch.warmup_epochs=1", "scratch.batch_size=16", "scratch.device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_weights):
    """The pipeline with scratch.run=always: both candidates exist, the gain is measured."""
    root = tmp_path_factory.mktemp("scratch")
    data = make_folder(root / "data", per_class=14, classes=("cat", "dog", "owl"))
    overrides = [*tiny_overrides(root, data, tiny_weights), "scratch.run=always", *FAST]
    cfg = load_params(None, overrides)
    results = {}
    for name in STAGE_NAMES[: STAGE_NAMES.index("register")]:  # the pipeline up to register
        results[name] = get(name).function(cfg)
    results["register"] = register(cfg)
    return cfg, results, overrides


def _copy(run, tmp_path, *overrides):
    """The run's artifacts in tmp_path with `overrides`, for a test that rewrites them."""
    cfg, _, base = run
    shutil.copytree(cfg.project.artifacts_dir, tmp_path / "artifacts")
    mine = [f"project.artifacts_dir={tmp_path / 'artifacts'}"]
    mine += [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return load_params(None, [*base, *mine, *overrides])


def _read(cfg, stage: str, name: str) -> dict:
    return json.loads((cfg.stage_dir(stage) / name).read_text())


def test_scratch_trains_and_records_its_decision(run):
    cfg, r, _ = run
    d = _read(cfg, "scratch", "decision.json")
    assert r["scratch"].ran and d["ran"] and d["reason"] == "scratch.run is always"
    assert d["epochs_run"] == len(_read(cfg, "scratch", "history.json")) == 3
    assert 270_000 < d["parameters"] < 275_000 and d["device"] == "cpu" and d["input"] == "32 px x 3"
    assert 0 <= d["val_accuracy"] <= 1 and d["val_loss"] > 0 and d["wall_s"] > 0
    assert (cfg.stage_dir("scratch") / "model" / "model.pt").is_file()
    assert not any((cfg.project.cache_dir / "scratch").iterdir())  # the checkpoint folder removed
    assert "# From scratch: trained" in (cfg.stage_dir("scratch") / "summary.md").read_text()


def test_select_lists_every_candidate_and_copies_the_chosen_file(run):
    cfg, r, _ = run
    d = _read(cfg, "select", "decision.json")
    assert [c["name"] for c in d["candidates"]] == ["transfer", "scratch"]
    assert all({"val_accuracy", "val_loss", "wall_s"} <= c.keys() for c in d["candidates"])
    assert d["chosen"] == r["select"].chosen and d["reason"] == r["select"].reason
    source = {"transfer": "finetune/model.pt", "scratch": "scratch/model/model.pt"}[d["chosen"]]
    chosen = (cfg.project.artifacts_dir / source).read_bytes()
    assert (cfg.stage_dir("select") / "model.pt").read_bytes() == chosen
    assert "| scratch | scratch |" in (cfg.stage_dir("select") / "summary.md").read_text()


def test_the_transfer_gain_in_metrics_mlflow_and_the_summary(run, capsys):
    import mlflow

    from headstart.cli import _summary

    cfg, r, _ = run
    g = _read(cfg, "evaluate", "metrics.json")["transfer_gain"]
    assert g["measured"] and g["n_images"] == r["evaluate"].n_test
    t, s = g["transfer"], g["scratch"]
    assert g["difference"] == pytest.approx(t["test_accuracy"] - s["test_accuracy"])
    assert g["ci_low"] <= g["difference"] <= g["ci_high"] and 0 <= g["mcnemar"]["p_value"] <= 1
    assert s["parameters"] == _read(cfg, "scratch", "decision.json")["parameters"]
    assert t["parameters"] > 100_000 and t["wall_s"] > 0 and s["wall_s"] > 0  # backbone + head
    assert "Transfer gain: " in (cfg.stage_dir("evaluate") / "summary.md").read_text()
    run_ = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(r["register"].run_id)
    assert run_.data.metrics["transfer_gain.difference"] == pytest.approx(g["difference"])
    assert run_.data.metrics["transfer_gain.scratch_parameters"] == s["parameters"]
    assert run_.data.tags["transfer_gain.measured"] == "true"
    assert run_.data.tags["select.chosen"] == r["select"].chosen
    assert run_.data.tags["scratch.trained"] == "true"
    curve = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        r["register"].run_id, "scratch_curve.val_loss"
    )
    assert sorted(m.step for m in curve) == [1, 2, 3]
    results = {k: v.__dict__ for k, v in r.items()}
    results["artifacts_dir"] = str(cfg.project.artifacts_dir)
    _summary(results)
    line = next(x for x in capsys.readouterr().out.splitlines() if "transfer gain" in x)
    assert f"{g['difference']:+.2f}" in line and "vs scratch" in line and "params" in line


def test_same_seed_same_scratch_metrics(run, tmp_path):
    cfg, _, _ = run
    again = _copy(run, tmp_path)
    scratch(again)
    first, second = (_read(c, "scratch", "decision.json") for c in (cfg, again))
    assert {k: second[k] for k in ("val_accuracy", "val_loss", "best_epoch")} == {
        k: first[k] for k in ("val_accuracy", "val_loss", "best_epoch")
    }
    assert _read(again, "scratch", "history.json") == _read(cfg, "scratch", "history.json")


def test_never_and_auto_without_evidence_keep_transfer_alone(run, tmp_path):
    cfg, _, _ = run
    for mode, expect in (("never", "scratch.run is never"), ("auto", "transfer is the right tool")):
        c = _copy(run, tmp_path / mode, f"scratch.run={mode}", "domain.on_mismatch=warn")
        result = scratch(c)
        assert not result.ran and expect in result.reason
        assert not any((c.stage_dir("scratch") / "model").iterdir())  # the folder out, empty
        assert select(c).chosen == "transfer"
        gain = evaluate(c).transfer_gain
        assert not gain["measured"] and expect in gain["why_not"]


def test_on_mismatch_scratch_goes_on_and_trains_scratch(run, tmp_path):
    """A mismatch with on_mismatch=scratch (the default) trains the scratch model under run=auto;
    with warn it does not; with fail the domain stage stops (tests/tasks/test_stages.py)."""
    cfg, r, _ = run
    c = _copy(run, tmp_path, "scratch.run=auto", "domain.on_mismatch=scratch")
    assert load_params(None, []).domain.on_mismatch == "scratch"
    verdict = domain(c).verdict  # the default no longer raises on a mismatch
    report = c.stage_dir("domain") / "report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "verdict": "mismatch"}))
    result = scratch(c)
    assert result.ran and "domain verdict mismatch" in result.reason, verdict
    warn = c.model_copy(update={"domain": c.domain.model_copy(update={"on_mismatch": "warn"})})
    assert not scratch(warn).ran


def test_a_split_too_small_for_scratch_keeps_transfer(run, tmp_path):
    cfg, _, _ = run
    c = _copy(run, tmp_path)
    manifest = c.stage_dir("validate") / "manifest.parquet"
    frame = pd.read_parquet(manifest)
    frame[frame["split"] != "val"].to_parquet(manifest, index=False)
    result = scratch(c)
    assert not result.ran and "too small for a from-scratch model" in result.reason
    assert "0 validation images" in result.reason and select(c).chosen == "transfer"


def test_a_selected_scratch_model_is_evaluated_exported_parity_gated_and_predicted(run, tmp_path, capsys):
    from headstart.cli import main
    from headstart.runtime import Predictor

    cfg, _, _ = run
    c = _copy(run, tmp_path, "export.fp16=false")
    metrics = c.stage_dir("train_head") / "metrics.json"  # a transfer model that learnt nothing
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "val_accuracy": 0.0}))
    assert select(c).chosen == "scratch"
    assert (c.stage_dir("select") / "model.pt").read_bytes() == (
        c.stage_dir("scratch") / "model" / "model.pt"
    ).read_bytes()
    calibrate(c)  # as the flow does: the rule (and its feature gate) is the selected model's
    ev = evaluate(c)
    assert ev.model_kind == "scratch" and ev.transfer_gain["measured"]
    assert ev.accuracy == pytest.approx(ev.transfer_gain["scratch"]["test_accuracy"])
    ex = export(c)
    assert ex.passed and ex.top1_agreement == 1.0
    onnx_file = c.stage_dir("export") / "model.onnx"
    predictor = Predictor(onnx_file, providers="cpu", warmup=False)
    assert predictor.spec.size == 32 and predictor.spec.crop_pct == 1.0
    import onnx

    meta = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert meta["headstart.model_kind"] == "scratch" and meta["headstart.architecture"] == "resnet20"
    rows = pd.read_csv(c.stage_dir("evaluate") / "predictions.csv")
    files = [str(c.prepare.data_dir / p) for p in rows["path"]]
    assert main(["predict", "--model", str(onnx_file), "--json", *files]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["label"] for o in out] == list(rows["predicted"])
