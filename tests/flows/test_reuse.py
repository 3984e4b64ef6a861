"""The warm flow: a stage whose inputs did not change is reused, not run; one changed param, image or
code input reruns what it reaches; an identical model is neither registered nor promoted again,
unless forced."""

from __future__ import annotations

import pytest

from tests.conftest import make_folder, make_image, tiny_overrides, write_params

pytestmark = pytest.mark.slow


def test_a_warm_flow_reuses_what_did_not_change(tmp_path, tiny_weights, prefect_harness, monkeypatch):
    import mlflow

    from flows.training import training
    from headstart import reuse
    from headstart.stages import STAGES

    data = make_folder(tmp_path / "data", per_class=12)
    params = str(write_params(tmp_path / "params.yaml", tiny_overrides(tmp_path, data, tiny_weights)))
    reusable = {s.name for s in STAGES if s.name not in reuse.ALWAYS_RUN}
    model = tmp_path / "artifacts" / "export" / "model.onnx"

    first = training(params_file=params)
    assert (
        first["reused"] == {} and first["register"]["model_version"] == "1" and first["promote"]["promoted"]
    )
    written = model.stat().st_mtime_ns

    # nothing changed: every stage but prepare, register and promote is reused; nothing is registered
    warm = training(params_file=params)
    assert set(warm["reused"]) == reusable and model.stat().st_mtime_ns == written
    reg = warm["register"]
    assert not reg["registered"] and reg["model_version"] == "1" and "same model as v1" in reg["reason"]
    assert "promote" not in warm and warm["train_head"] == first["train_head"]
    run = mlflow.MlflowClient(reg["tracking_uri"]).get_run(reg["run_id"])  # a truthful, finished run
    assert run.info.status == "FINISHED" and run.info.run_id != first["register"]["run_id"]
    assert run.data.tags["headstart.reused_stages"].split(",") == list(warm["reused"])
    assert run.data.metrics["test_accuracy"] == first["evaluate"]["accuracy"]

    # one param: its stage reruns, the rest is reused
    param = training(params_file=params, overrides=["evaluate.batch_size=7"])
    assert set(param["reused"]) == reusable - {"evaluate"}

    # one code input: monkeypatched, as an edit of calibrate's closure would change it
    real = reuse.stage_code
    monkeypatch.setattr(reuse, "stage_code", lambda s: real(s) + ("-edited" if s.name == "calibrate" else ""))
    code = training(params_file=params)
    assert "calibrate" not in code["reused"] and {"train_head", "export"} <= set(code["reused"])
    monkeypatch.undo()

    # one image: every stage that reads the images reruns, and the new model is registered
    make_image(data / "cat" / "cat_003.png", (200, 30, 30), seed=99)
    image = training(params_file=params)
    assert not set(image["reused"]) & {s.name for s in STAGES if s.reads_data}
    assert image["register"]["registered"] and image["register"]["model_version"] == "2"
    assert model.stat().st_mtime_ns != written

    # --force: everything runs, and the same model is registered again
    forced = training(params_file=params, force=True)
    assert forced["reused"] == {} and forced["register"]["model_version"] == "3" and "promote" in forced
    assert training(params_file=params)["register"]["model_version"] == "3"  # warm again: nothing new
