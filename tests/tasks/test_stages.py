"""Each stage on a few tiny images in tmp_path, in pipeline order, plus its failure modes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from headstart import HeadstartError
from headstart.config import load_params
from tasks.backbone import backbone
from tasks.calibrate import calibrate
from tasks.domain import DomainMismatch, domain
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.finetune import finetune
from tasks.prepare import prepare
from tasks.register import register
from tasks.scratch import scratch
from tasks.select import select
from tasks.train_head import train_head
from tasks.validate import validate
from tests.conftest import make_folder, tiny_overrides


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_weights):
    """Run every stage once; the tests below read what they wrote."""
    root = tmp_path_factory.mktemp("stages")
    data = make_folder(root / "data", per_class=14, classes=("cat", "dog", "owl"))
    (data / "cat" / "broken.png").write_bytes(b"not an image")
    cfg = load_params(None, [*tiny_overrides(root, data, tiny_weights), "export.int8=true"])
    results = {"prepare": prepare(cfg), "validate": validate(cfg), "backbone": backbone(cfg)}
    results["domain"] = domain(cfg)
    results["train_head"] = train_head(cfg)
    results["finetune"] = finetune(cfg)  # 29 training images: the gate stays closed
    results["scratch"] = scratch(cfg)  # on_mismatch=warn and 29 images: transfer alone
    results["select"] = select(cfg)
    results["calibrate"] = calibrate(cfg)
    results["evaluate"] = evaluate(cfg)
    results["export"] = export(cfg)
    results["register"] = register(cfg, tags={"origin": "test"})
    return cfg, results


@pytest.fixture
def own_copy(pipeline, tmp_path):
    """The pipeline's artifacts copied for one test that rewrites them (the module's stay as written)."""
    import shutil

    cfg, _ = pipeline
    shutil.copytree(cfg.project.artifacts_dir, tmp_path / "artifacts")
    project = cfg.project.model_copy(update={"artifacts_dir": tmp_path / "artifacts"})
    mlflow = cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    return cfg.model_copy(update={"project": project, "mlflow": mlflow})


def test_prepare_writes_manifest_with_every_file(pipeline):
    cfg, r = pipeline
    out = cfg.stage_dir("prepare")
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert r["prepare"].n_files == len(manifest) == 43 and r["prepare"].n_images == 42
    assert set(manifest.columns) >= {
        "path",
        "label",
        "sha256",
        "width",
        "height",
        "mode",
        "bytes",
        "readable",
        "reason",
        "phash",
        "mean_r",
        "std_r",
        "split",
    }
    broken = manifest.set_index("path").loc["cat/broken.png"]
    assert not broken["readable"] and "not a readable image" in broken["reason"] and broken["split"] == ""
    assert set(manifest.loc[manifest["readable"], "split"]) == {"train", "val", "test"}
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["cat", "dog", "owl"] and report["data_hash"] == r["prepare"].data_hash


def test_validate_quarantines_the_unreadable_file_and_passes(pipeline):
    cfg, r = pipeline
    out = cfg.stage_dir("validate")
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert list(quarantine["path"]) == ["cat/broken.png"]
    clean = pd.read_parquet(out / "manifest.parquet")
    assert len(clean) == r["validate"].n_images == 42 and "cat/broken.png" not in set(clean["path"])
    report = json.loads((out / "report.json").read_text())
    assert report["success"] and report["n_quarantined"] == 1
    assert "every_file_is_a_readable_image" in report["warnings"]
    assert (out / "data_docs" / "index.html").exists()
    assert "every_file_is_a_readable_image" in (out / "summary.md").read_text()


def test_validate_failure_stops_with_the_expectation_named(pipeline, tmp_path):
    cfg, _ = pipeline
    strict = cfg.model_copy(
        update={
            "project": cfg.project.model_copy(update={"artifacts_dir": tmp_path / "art"}),
            "validate": cfg.validate.model_copy(update={"classes": ["cat", "dog"]}),
        }
    )
    prepare(strict)
    with pytest.raises(HeadstartError, match="labels_as_declared"):
        validate(strict)
    report = json.loads((tmp_path / "art" / "validate" / "failed" / "report.json").read_text())
    assert report["success"] is False and report["failed"] == ["labels_as_declared"]
    assert not (tmp_path / "art" / "validate" / "manifest.parquet").exists()  # no data for training


def test_failed_validation_keeps_the_last_good_manifest(pipeline, tmp_path):
    """A gate commits last: a later train_head must not train on data the gate refused."""
    import shutil

    cfg, _ = pipeline
    art = tmp_path / "art"
    shutil.copytree(cfg.project.artifacts_dir / "prepare", art / "prepare")
    ok = cfg.model_copy(update={"project": cfg.project.model_copy(update={"artifacts_dir": art})})
    validate(ok)
    before = {p.name: p.read_bytes() for p in (art / "validate").iterdir() if p.is_file()}
    strict = ok.model_copy(update={"validate": ok.validate.model_copy(update={"classes": ["cat", "dog"]})})
    with pytest.raises(HeadstartError, match="labels_as_declared"):
        validate(strict)
    assert {p.name: p.read_bytes() for p in (art / "validate").iterdir() if p.is_file()} == before
    assert json.loads((art / "validate" / "failed" / "report.json").read_text())["success"] is False
    validate(ok)  # a later success clears the failure report
    assert not (art / "validate" / "failed").exists()


def test_domain_writes_a_verdict_with_every_signal(pipeline):
    cfg, r = pipeline
    out = cfg.stage_dir("domain")
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == r["domain"].verdict in ("in_domain", "shifted", "mismatch")
    assert report["n_images"] == 16 and len(report["profile"]) == report["signals"]["bn_layers"] > 0
    assert {"bn_divergence", "max_softmax", "energy", "input_mean", "grey_fraction"} <= set(report["signals"])
    assert report["reference"]["borrowed_from"] == "efficientnet_lite0"  # the tiny backbone is uncalibrated
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG" and "Domain check" in (
        out / "summary.md"
    ).read_text()
    assert "NaN" not in (out / "report.json").read_text()


def test_domain_mismatch_with_fail_stops_with_advice(pipeline, tmp_path):
    cfg, r = pipeline
    art = tmp_path / "art"
    strict = cfg.model_copy(
        update={
            "project": cfg.project.model_copy(update={"artifacts_dir": art}),
            "domain": cfg.domain.model_copy(update={"on_mismatch": "fail"}),
        }
    )
    prepare(strict)
    validate(strict)
    if r["domain"].verdict != "mismatch":
        pytest.skip("the tiny data did not come out as a mismatch")  # see test_domain_on_real_images
    with pytest.raises(DomainMismatch, match="on_mismatch=scratch .* or choose another backbone"):
        domain(strict)
    assert json.loads((art / "domain" / "failed" / "report.json").read_text())["verdict"] == "mismatch"
    assert not (art / "domain" / "report.json").exists()


def test_train_head_writes_model_history_metrics(pipeline):
    cfg, r = pipeline
    out = cfg.stage_dir("train_head")
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert (out / "model.pt").stat().st_size > 0
    assert metrics["n_train"] + metrics["n_val"] + r["evaluate"].n_test == 42  # the broken file is out
    # one backbone pass per image: the domain probe's sample is already in the feature cache
    shared = json.loads((cfg.stage_dir("domain") / "report.json").read_text())["features_shared"]
    assert shared == 16 and metrics["features_cached"] == shared
    assert metrics["features_computed"] == metrics["n_train"] + metrics["n_val"] - shared
    assert len(history) == metrics["epochs_run"] and 1 <= metrics["best_epoch"] <= len(history)
    # every backbone tensor hashed before and after head training: bit-identical
    assert metrics["frozen_check"]["unchanged"] and metrics["frozen_check"]["tensors"] > 50
    assert metrics["val_accuracy"] >= 0.9  # class colours are trivially separable


def test_train_head_again_uses_the_feature_cache(own_copy):
    assert train_head(own_copy).features_computed == 0


def test_train_head_proves_a_lazy_backbone_frozen_warm_and_cold(pipeline, own_copy, monkeypatch, tmp_path):
    """A backbone built on first use (as a built-in one is): a warm train_head (every feature cached)
    builds none and its proof says so; a cold one builds it for the features, then compares it with a
    fresh build, whose digest is the eager proof's."""
    import dataclasses

    from tasks import _backbone

    load, builds = _backbone.load, []

    def build(cfg):
        builds.append(1)
        return load(cfg).model

    monkeypatch.setattr(
        _backbone, "load", lambda cfg: dataclasses.replace(load(cfg), _model=lambda: build(cfg))
    )
    train_head(own_copy)
    warm = json.loads((own_copy.stage_dir("train_head") / "metrics.json").read_text())["frozen_check"]
    assert builds == [] and warm["loaded"] is False and warm["tensors"] == 0 and warm["unchanged"]
    cold = own_copy.model_copy(
        update={"project": own_copy.project.model_copy(update={"cache_dir": tmp_path / "cold_cache"})}
    )
    assert train_head(cold).features_computed > 0
    proof = json.loads((cold.stage_dir("train_head") / "metrics.json").read_text())["frozen_check"]
    eager = json.loads((pipeline[0].stage_dir("train_head") / "metrics.json").read_text())["frozen_check"]
    assert len(builds) == 2 and proof["loaded"] and proof["compared_with"].startswith("a fresh build")
    assert (proof["tensors"], proof["sha256"]) == (eager["tensors"], eager["sha256"]) and proof["unchanged"]


def test_evaluate_metrics_and_confusion(pipeline):
    cfg, r = pipeline
    out = cfg.stage_dir("evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == r["evaluate"].accuracy >= 0.9
    assert set(metrics["per_class"]) == {"cat", "dog", "owl"}
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    cm = json.loads((out / "confusion.json").read_text())["matrix"]
    assert sum(map(sum, cm)) == metrics["n"]
    low, high = metrics["accuracy_ci"]  # promotion's bootstrap over the test images
    assert low <= metrics["accuracy"] <= high and metrics["ci_confidence"] == cfg.promote.confidence
    assert r["evaluate"].accuracy_ci == [low, high]
    assert (
        f"Accuracy {metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f})"
        in (out / "summary.md").read_text()
    )
    kept = metrics["abstention"]
    assert kept["selective_accuracy_ci"] is None or len(kept["selective_accuracy_ci"]) == 2
    candidate = json.loads((cfg.stage_dir("select") / "decision.json").read_text())["candidates"][0]
    assert (
        candidate["n_val"] == json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())["n_val"]
    )
    assert candidate["val_accuracy_ci"][0] <= candidate["val_accuracy"] <= candidate["val_accuracy_ci"][1]
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == metrics["n"] and set(preds.columns) >= {"path", "actual", "predicted"}


def test_the_run_summary_shows_each_accuracy_with_its_interval(pipeline, capsys):
    from headstart.cli import _summary

    cfg, r = pipeline
    results = {k: v.__dict__ for k, v in r.items()} | {"artifacts_dir": str(cfg.project.artifacts_dir)}
    _summary(results)
    lines = capsys.readouterr().out.splitlines()
    ev, low, high = r["evaluate"], *r["evaluate"].accuracy_ci
    test = next(x for x in lines if x.startswith("  test "))
    assert f"accuracy {ev.accuracy:.4f} (95% CI {low:.4f}-{high:.4f}), macro-F1" in test
    assert f"on {ev.n_test} images" in test
    select_line = next(x for x in lines if x.startswith("  select "))
    assert "; val accuracy " in select_line and "(95% CI " in select_line and "images" in select_line
    head = next(x for x in lines if x.startswith("  head "))  # tiny_overrides turn the search off
    assert head.endswith(
        "settings as given (search off); train_head.search.trials is 0: the settings in "
        "params.yaml, early-stopped on the val split"
    )


def test_export_parity_on_real_images_of_every_split(pipeline):
    cfg, r = pipeline
    parity = json.loads((cfg.stage_dir("export") / "parity.json").read_text())
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    # no labels are needed to compare runtimes: every usable image (42 < export.parity_max_images)
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["n_images"] == r["validate"].n_images == 42
    assert parity["variants"]["fp32"]["n_labelled"] == r["evaluate"].n_test
    assert "CPUExecutionProvider" in parity["providers"]
    assert set(parity["variants"]) == {"fp32", "fp16", "int8"}
    assert parity["registered"] == ["fp32", "fp16", "int8"]
    # int8 is calibrated on every training image (fewer than export.int8_calibration_images)
    int8 = parity["variants"]["int8"]
    n_train = json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())["n_train"]
    assert int8["calibration_images"] == n_train and int8["calibration_skipped"] == []
    assert 1e-4 < int8["max_abs_logit_diff"] <= cfg.export.tolerances.int8.max_abs_diff
    for name, v in parity["variants"].items():
        assert v["passed"] and set(v["batch_sizes"]) == {"1", "7", "32"}, name
        # the test metric through onnxruntime equals torch's, at every batch size
        assert {b["accuracy_onnx"] for b in v["batch_sizes"].values()} == {v["accuracy_torch"]}, name
    assert parity["variants"]["fp32"]["accuracy_torch"] == pytest.approx(r["evaluate"].accuracy)
    assert (cfg.stage_dir("export") / "variants" / "model_fp16.onnx").stat().st_size < (
        0.7 * (cfg.stage_dir("export") / "model.onnx").stat().st_size
    )
    summary = (cfg.stage_dir("export") / "summary.md").read_text()
    assert "| model.onnx | 7 |" in summary and "- int8: passed" in summary
    assert f"model_int8.onnx: calibrated on {int8['calibration_images']} training images" in summary


def test_register_logs_one_run_with_everything(pipeline):
    import mlflow

    cfg, r = pipeline
    reg = r["register"]
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(reg.run_id)
    assert run.data.params["train_head.backbone"] == "test_efficientnet"
    assert run.data.metrics["test_accuracy"] == pytest.approx(r["evaluate"].accuracy)
    assert run.data.metrics["export.top1_agreement"] == 1.0
    low, high = r["evaluate"].accuracy_ci
    assert (
        run.data.metrics["test_accuracy_ci_low"] == low and run.data.metrics["test_accuracy_ci_high"] == high
    )
    assert (
        run.data.metrics["select.transfer.val_accuracy_ci_high"]
        >= run.data.metrics["select.transfer.val_accuracy"]
    )
    assert run.data.tags["origin"] == "test" and run.data.tags["data_hash"] == r["prepare"].data_hash
    artifacts = {a.path for a in client.list_artifacts(reg.run_id, "evaluate")}
    assert "evaluate/confusion.png" in artifacts
    validation = {a.path for a in client.list_artifacts(reg.run_id, "validate")}
    assert {"validate/report.json", "validate/quarantine.csv", "validate/data_docs"} <= validation
    assert run.data.metrics["n_quarantined"] == 1
    assert run.data.tags["domain.verdict"] == r["domain"].verdict
    assert run.data.metrics["domain.score"] == pytest.approx(r["domain"].score)
    assert "domain/profile.png" in {a.path for a in client.list_artifacts(reg.run_id, "domain")}
    assert "backbone/decision.json" in {a.path for a in client.list_artifacts(reg.run_id, "backbone")}
    assert (run.data.tags["backbone"], run.data.tags["backbone.how"]) == ("test_efficientnet", "fixed")
    version = client.get_model_version("tiny", reg.model_version)
    assert version.run_id == reg.run_id
    run_json = json.loads((cfg.stage_dir("register") / "run.json").read_text())
    assert run_json["model_uri"] == "models:/tiny/1"


def test_the_run_spans_training_and_holds_each_curve_point_once(pipeline):
    """Curves were logged while train_head ran (the run opened then) and register did not re-log them."""
    import mlflow

    cfg, r = pipeline
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(r["register"].run_id)
    epochs = json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())["epochs_run"]
    tuned = len(json.loads((cfg.stage_dir("finetune") / "history.json").read_text()))
    points = client.get_metric_history(run.info.run_id, "curve.val_loss")
    assert epochs > 1 and sorted(m.step for m in points) == list(range(1, epochs + tuned + 1))
    times = sorted(m.timestamp for m in points)  # one per epoch as it ended, not one batch at register
    assert run.info.start_time <= times[0] < times[epochs - 1] < run.info.end_time
    assert run.info.status == "FINISHED"


def test_registered_model_loads_and_predicts(pipeline, monkeypatch):
    """The version is the image-in pyfunc: encoded bytes in, the label out."""
    import mlflow.pyfunc
    import pandas as pd

    cfg, r = pipeline
    # undone after the test, even a failed one
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(r["register"].model_uri)
    image = (cfg.prepare.data_dir / "dog" / "dog_000.png").read_bytes()
    out = model.predict(pd.DataFrame({"image": [image]}))
    assert len(out) == 1 and out[0]["label"] == "dog" and len(out[0]["probabilities"]) == 3


def test_no_temporary_folders_left(pipeline):
    cfg, _ = pipeline
    leftovers = [p.name for p in cfg.project.artifacts_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _exported(cfg) -> dict[str, bytes]:
    out = cfg.stage_dir("export")
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _with_tolerance(cfg, variant: str, **changes):
    tol = cfg.export.tolerances
    tight = tol.model_copy(update={variant: getattr(tol, variant).model_copy(update=changes)})
    return cfg.model_copy(update={"export": cfg.export.model_copy(update={"tolerances": tight})})


def test_failed_parity_gate_keeps_the_last_good_model(own_copy, capsys):
    """The fp32 gate fails: the report goes to export/failed/, model.onnx stays byte-identical and
    `headstart predict` still serves it."""
    from headstart.cli import main

    cfg = own_copy
    before = _exported(cfg)
    with pytest.raises(HeadstartError, match="parity failed: fp32: max abs logit diff"):
        export(_with_tolerance(cfg, "fp32", max_abs_diff=1e-30))
    after = _exported(cfg)
    assert {k: v for k, v in after.items() if not k.startswith("failed/")} == before
    failed = json.loads(after["failed/parity.json"])
    assert failed["passed"] is False and failed["variants"]["fp32"]["failures"]
    image = str(cfg.prepare.data_dir / "dog" / "dog_000.png")
    assert main(["predict", "--model", str(cfg.stage_dir("export") / "model.onnx"), image]) == 0
    assert "\tdog\t" in capsys.readouterr().out
    export(cfg)  # a success clears the failure report
    assert "failed/parity.json" not in _exported(cfg)


def test_a_failed_optional_variant_drops_out_and_the_model_still_ships(own_copy):
    cfg = own_copy
    result = export(_with_tolerance(cfg, "fp16", max_abs_diff=1e-30))
    parity = json.loads((cfg.stage_dir("export") / "parity.json").read_text())
    # the pipeline fixture turns int8 on: it passes its own gate and stays
    assert (
        result.variants == ["fp32", "int8"] and parity["passed"] and parity["registered"] == ["fp32", "int8"]
    )
    assert parity["variants"]["fp16"]["passed"] is False and not parity["variants"]["fp16"]["required"]
    assert [f.name for f in (cfg.stage_dir("export") / "variants").iterdir()] == ["model_int8.onnx"]
    assert "not registered" in (cfg.stage_dir("export") / "summary.md").read_text()
    required = _with_tolerance(cfg, "fp16", max_abs_diff=1e-30)
    required = required.model_copy(
        update={"export": required.export.model_copy(update={"require": ["fp16"]})}
    )
    with pytest.raises(HeadstartError, match="parity failed: fp16"):
        export(required)


def test_stage_before_its_inputs_names_the_missing_file(tiny_params):
    with pytest.raises(HeadstartError, match="run the validate stage first"):
        train_head(tiny_params)
    with pytest.raises(HeadstartError, match="run the validate stage first"):
        domain(tiny_params)
    with pytest.raises(HeadstartError, match="run the prepare stage first"):
        validate(tiny_params)


def test_prepare_on_bad_folders(tmp_path, tiny_params):
    def with_data(path):
        return tiny_params.model_copy(
            update={"prepare": tiny_params.prepare.model_copy(update={"data_dir": path})}
        )

    with pytest.raises(HeadstartError, match="does not exist"):
        prepare(with_data(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadstartError, match="is empty"):
        prepare(with_data(tmp_path / "empty"))
    assert not tiny_params.stage_dir("prepare").exists()  # nothing half-written


def test_one_class_passes_prepare_and_fails_validation(tmp_path, tiny_params):
    one = make_folder(tmp_path / "one", per_class=8, classes=("cat",))
    cfg = tiny_params.model_copy(update={"prepare": tiny_params.prepare.model_copy(update={"data_dir": one})})
    assert prepare(cfg).classes == ["cat"]
    with pytest.raises(HeadstartError, match="enough_classes"):
        validate(cfg)


def test_a_perturbed_export_fails_the_gate(own_copy, monkeypatch):
    """An ONNX file that disagrees with torch (one weight nudged after export) never passes."""
    import onnx
    from onnx import numpy_helper

    import headstart.export as ex

    cfg = own_copy
    real = ex.export_onnx

    def perturbed(*args, **kwargs):
        path = real(*args, **kwargs)
        proto = onnx.load(path)
        init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight
        arr = numpy_helper.to_array(init).copy()
        arr.flat[:: max(1, arr.size // 50)] *= 3.0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(proto, path)
        return path

    monkeypatch.setattr("headstart.export.export_onnx", perturbed)
    with pytest.raises(HeadstartError, match="parity failed"):
        export(cfg)
    parity = json.loads((cfg.stage_dir("export") / "failed" / "parity.json").read_text())
    assert parity["passed"] is False and parity["max_abs_logit_diff"] > 1e-3


def test_predict_cli_matches_evaluate_and_reports_bad_files(pipeline, capsys, tmp_path):
    """`headstart predict` on the test images gives evaluate's accuracy; a broken file is reported,
    the rest predicted; models:/NAME/VERSION resolves through the MLflow registry."""
    from headstart.cli import main

    cfg, r = pipeline
    rows = pd.read_csv(cfg.stage_dir("evaluate") / "predictions.csv")
    files = [str(cfg.prepare.data_dir / p) for p in rows["path"]]
    onnx_file = str(cfg.stage_dir("export") / "model.onnx")
    assert main(["predict", "--model", onnx_file, "--json", *files]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["label"] for o in out] == list(rows["predicted"])
    accuracy = float(np.mean([o["label"] == a for o, a in zip(out, rows["actual"], strict=True)]))
    assert accuracy == pytest.approx(r["evaluate"].accuracy)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", "--model", onnx_file, files[0], str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[1] == rows["predicted"][0] and lines[1].startswith(f"{broken}\terror")

    uri = f"models:/tiny/{r['register'].model_version}"
    overrides = ["--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]
    assert main(["predict", "--model", uri, *overrides, "--json", files[0]]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == rows["predicted"][0]
    # the fp16 export rides in the same model version; served from the registry, it is that file
    for variant in ("fp16", "int8"):
        assert main(["predict", "--model", uri, "--variant", variant, *overrides, "--json", files[0]]) == 0
        assert json.loads(capsys.readouterr().out)["label"] == rows["predicted"][0], variant
    import onnx
    from onnx.numpy_helper import to_array

    from headstart.runtime import EXPORT_FILES
    from headstart.tracking import downloaded_model

    for variant, file in EXPORT_FILES.items():
        # MLflow re-serialises the registered file (external data), so compare what it holds
        with downloaded_model(uri, cfg, variant) as path:
            got, folder = onnx.load(path), path.parent
        assert not folder.exists()  # the download does not outlive its use
        want = onnx.load(cfg.stage_dir("export") / file)
        assert [n.op_type for n in got.graph.node] == [n.op_type for n in want.graph.node], variant
        weights = {t.name: to_array(t) for t in got.graph.initializer}
        assert weights.keys() == {t.name for t in want.graph.initializer}, variant
        for t in want.graph.initializer:
            np.testing.assert_array_equal(weights[t.name], to_array(t), err_msg=f"{variant}: {t.name}")
        assert got.metadata_props == want.metadata_props, variant


def test_golden_image_runtime_equals_torch(pipeline):
    """tests/data/golden.png (a crop of scikit-image's coffee photo, made by tests/data/make_golden.py)
    through headstart.runtime gives the probabilities evaluate's torch path gives."""
    from pathlib import Path

    import torch

    from headstart.features import Features
    from headstart.runtime import Predictor
    from headstart.training import load_model

    golden = Path(__file__).parents[1] / "data" / "golden.png"
    cfg, _ = pipeline
    model = load_model(cfg.stage_dir("finetune") / "model.pt")
    feats, _ = Features(model.backbone, "torch", cfg.project.cache_dir).__call__([golden], ["golden"])
    with torch.no_grad():
        expected = model.classifier.head(torch.from_numpy(feats)).softmax(1).numpy()
    for file in ("model.onnx", "variants/model_fp16.onnx"):
        got = Predictor(cfg.stage_dir("export") / file).predict([golden])
        np.testing.assert_allclose(got, expected, atol=1e-4 if file == "model.onnx" else 2e-2)


def test_report_shows_every_stage_of_the_tiny_pipeline_and_joins_its_mlflow_run(pipeline):
    """The run report of the stages above: each section filled from their outputs, the images
    embedded, the page logged to the pipeline's MLflow run."""
    import mlflow

    from headstart.report import SECTIONS
    from tasks.report import report

    cfg, r = pipeline
    domain_report = json.loads((cfg.stage_dir("domain") / "report.json").read_text())
    far = [f["divergence"] for f in domain_report["furthest"]]
    assert len(far) == 16 and far == sorted(far, reverse=True)  # each image's own divergence, highest first
    rows = pd.read_csv(cfg.stage_dir("evaluate") / "predictions.csv", keep_default_na=False)
    assert set(rows["abstained"]) <= {"", "ambiguous", "out_of_distribution"}
    out = report(cfg)
    text = (cfg.stage_dir("report") / "index.html").read_text(encoding="utf-8")
    for sid, _, _ in SECTIONS:
        section = text.split(f'<section id="{sid}">', 1)[1].split("</section>", 1)[0]
        assert sid == "promotion" or 'class="skip"' not in section, (sid, section[:300])
        assert "could not be shown" not in section, section[:300]
    assert text.count("data:image/jpeg;base64,") >= out.thumbnails >= 12  # distinct images, some shown twice
    assert "cat/broken.png" in text and "not run" in text.split('id="promotion"')[1]  # promote: not here
    assert out.mlflow_run_id == r["register"].run_id
    logged = mlflow.MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(out.mlflow_run_id, "report")
    assert "report/index.html" in {a.path for a in logged}
