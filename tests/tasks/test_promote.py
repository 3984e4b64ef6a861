"""promote on a real MLflow registry (sqlite, and a real tracking server on loopback): first model,
better, worse, drift against `best`, clean evidence, failed gates, rollback, models that cannot be
compared, an unreachable server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from headstart import HeadstartError
from headstart.config import load_params
from headstart.stages import STAGES as PIPELINE
from tasks.promote import promote, rollback
from tasks.register import register
from tests.conftest import make_folder, tiny_overrides

pytestmark = pytest.mark.slow  # two pipelines trained to export, registries per test: not the edit loop's

STAGES = tuple(s.function for s in PIPELINE if s.name not in ("promote", "report"))  # up to register
# a head that learned nothing, made to reach the registry anyway (the signal gate off): promotion's own
# comparison is what refuses it in these tests; evaluate's gate has its own (tests/flows/test_few_images.py)
BAD = (
    "train_head.max_epochs=1",
    "train_head.lr=1e-7",
    "train_head.patience=1",
    "evaluate.signal_confidence=0",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_weights):
    """Two pipelines trained once on the same data, up to export: a good head and a deliberately bad
    one. Never registered here: each test registers copies in its own MLflow store."""
    root = tmp_path_factory.mktemp("promote")
    data = make_folder(root / "data", per_class=14, classes=("cat", "dog", "owl"))
    # 9 test images here; the comparisons below need a floor that tiny data can meet
    base = [
        *tiny_overrides(root, data, tiny_weights),
        "register.model_name=promo",
        "promote.min_clean_images=5",
    ]
    cfgs = {}
    for name, extra in (("good", ()), ("bad", BAD)):
        cfgs[name] = load_params(None, [*base, f"project.artifacts_dir={root / name}", *extra])
        for stage in STAGES[:-1]:
            stage(cfgs[name])
    acc = {
        n: json.loads((c.stage_dir("evaluate") / "metrics.json").read_text())["accuracy"]
        for n, c in cfgs.items()
    }
    assert acc["good"] > acc["bad"] + 0.3, acc  # the premise of the comparisons below
    empty = root / "empty.db"  # an MLflow store migrated once; each test gets a copy (seconds saved each)
    mlflow.MlflowClient(f"sqlite:///{empty}").search_experiments()
    return {"data": data, "base": base, "empty_store": empty, **cfgs}


@pytest.fixture
def world(trained, tmp_path):
    """The trained pipelines, and `pipeline` making projects whose registry (MLflow store) is this
    test's own, so no test sees another's versions, aliases or deleted artifacts."""
    shutil.copy(trained["empty_store"], tmp_path / "mlflow.db")
    store = [
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'mlruns'}",
    ]

    def pipeline(name: str, *extra: str, run: bool = True, copy: str | None = None):
        cfg = load_params(
            None, [*trained["base"], *store, f"project.artifacts_dir={tmp_path / name}", *extra]
        )
        if copy:
            shutil.copytree(trained[copy].project.artifacts_dir, cfg.project.artifacts_dir)
        for stage in STAGES if run else ():
            stage(cfg)
        return cfg

    return {**trained, "root": tmp_path, "pipeline": pipeline}


def _aliases(cfg, name="promo") -> dict[str, str]:
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _version_tags(cfg, version, name="promo") -> dict[str, str]:
    return mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_model_version(name, version).tags


def test_champion_challenger_and_rollback(world):
    good = world["pipeline"]("good", run=False, copy="good")
    bad = world["pipeline"]("bad", *BAD, run=False, copy="bad")
    g, b = register(good).model_version, register(bad).model_version
    # the bad head first -> champion: there is no champion yet
    first = promote(bad)
    assert first.promoted and first.champion == b and "no champion yet" in first.reason
    assert _aliases(bad) == {"champion": b, "best": b}

    # the good head beats it on the same test images -> champion, the bad one -> previous
    second = promote(good)
    assert second.promoted and second.champion == g and "not worse" in second.reason
    assert _aliases(good) == {"champion": g, "previous": b, "best": g}
    tags = _version_tags(good, g)
    assert tags["promotion.decision"] == "champion" and float(tags["promotion.ci_low"]) > 0
    assert float(tags["promotion.mcnemar_p"]) <= 1 and json.loads(tags["promotion.gates"])["export_parity"]
    decision = json.loads((good.stage_dir("promote") / "decision.json").read_text())
    n_test = json.loads((good.stage_dir("evaluate") / "metrics.json").read_text())["n"]
    assert decision["comparison"]["n_images"] == decision["clean"]["n_images"] == n_test  # same splits
    md = (good.stage_dir("promote") / "summary.md").read_text()
    assert f"v{g} (new)" in md and f"v{b} (champion)" in md and md.count("Confusion matrix") == 2
    client = mlflow.MlflowClient(good.mlflow.tracking_uri)
    run_id = client.get_model_version("promo", g).run_id
    assert "promote/comparison.md" in {a.path for a in client.list_artifacts(run_id, "promote")}

    # the bad model registered again (forced: it equals the latest version) is worse than the
    # champion -> challenger; champion stays
    register(bad, force=True)
    third = promote(bad)  # the version from bad's new run.json
    assert third.version == "3" and not third.promoted and "could be worse" in third.reason
    assert _aliases(bad) == {"champion": g, "previous": b, "challenger": "3", "best": g}
    assert _version_tags(bad, "3")["promotion.decision"] == "challenger"

    # rollback: champion back to the previous version (`best` stays), and back again
    back = rollback(good)
    assert back.champion == b and _aliases(good) == {
        "champion": b,
        "previous": g,
        "challenger": "3",
        "best": g,
    }
    # the bad model again (forced: an identical model is otherwise not registered twice): no worse
    # than the champion it equals, but worse than the best so far
    register(bad, force=True)
    drift = promote(bad)
    assert (
        not drift.promoted
        and drift.reason.startswith("drift")
        and f"best champion so far v{g}" in drift.reason
    )
    decision = json.loads((bad.stage_dir("promote") / "decision.json").read_text())
    assert decision["comparison"]["difference"] == 0 and decision["best_comparison"]["difference"] < 0
    assert (
        decision["clean"]["versions"] == ["4", b, g]
        and float(_version_tags(bad, "4")["promotion.best.ci_low"]) < 0
    )
    assert _aliases(bad) == {"champion": b, "previous": g, "challenger": "4", "best": g}
    rollback(good)
    assert _aliases(good)["champion"] == g

    # the champion serves predictions by alias
    from headstart.cli import main

    image = next((world["data"] / "owl").glob("*.png"))
    args = [
        "predict",
        "--model",
        "models:/promo@champion",
        "--set",
        f"mlflow.tracking_uri={good.mlflow.tracking_uri}",
    ]
    assert main([*args, str(image)]) == 0


def test_a_failed_gate_never_promotes(world, capsys):
    cfg = world["pipeline"](
        "gated", "register.model_name=gated", "promote.allowed_verdicts=[in_domain]", run=False
    )
    shutil.copytree(world["good"].project.artifacts_dir, cfg.project.artifacts_dir)
    register(cfg)
    result = promote(cfg)
    verdict = json.loads((cfg.stage_dir("domain") / "report.json").read_text())["verdict"]
    assert verdict != "in_domain"  # the random tiny backbone's images are no photos
    assert not result.promoted and result.champion is None and "gate failed: domain" in result.reason
    assert _aliases(cfg, "gated") == {"challenger": "1"}


def test_models_with_different_classes_are_not_compared(world, tmp_path):
    three = world["pipeline"]("good", run=False, copy="good")
    register(three)
    assert promote(three).promoted  # a three-class champion
    two = make_folder(tmp_path / "two-images", per_class=14, classes=("cat", "dog"))
    cfg = world["pipeline"]("two", f"prepare.data_dir={two}", "register.model_name=promo")
    champion = _aliases(cfg)["champion"]
    result = promote(cfg)
    assert not result.promoted and result.champion == champion
    assert "cannot compare" in result.reason and "predicts" in result.reason


def test_a_champion_whose_artifact_is_gone_is_not_compared(world):
    cfg = world["pipeline"]("lost", "register.model_name=lost", run=False)
    shutil.copytree(world["good"].project.artifacts_dir, cfg.project.artifacts_dir)
    register(cfg)
    assert promote(cfg).promoted  # v1 champion
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    source = client.get_model_version("lost", "1").source
    run = client.get_run(client.get_model_version("lost", "1").run_id)
    shutil.rmtree(run.info.artifact_uri.removeprefix("file://"), ignore_errors=True)
    for folder in (world["root"] / "mlruns").rglob("models"):
        shutil.rmtree(folder, ignore_errors=True)  # MLflow 3 keeps logged models here
    register(cfg, force=True)  # the same model again, on purpose
    result = promote(cfg)
    assert not result.promoted and "cannot compare with champion v1" in result.reason, (result, source)
    assert _aliases(cfg, "lost") == {"champion": "1", "challenger": "2", "best": "1"}


def test_an_unreachable_tracking_server_fails_clearly(world, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    port = _free_port()
    cfg = world["pipeline"]("down", f"mlflow.tracking_uri=http://127.0.0.1:{port}", run=False)
    with pytest.raises(HeadstartError, match="unreachable"):
        promote(cfg, version="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts an mlflow server (~40 s on 2 cores): not the edit loop's
def test_a_real_tracking_server_on_loopback(world, tmp_path):
    """mlflow server on 127.0.0.1: the pipeline registers and promotes there, and `predict` serves
    models:/NAME@champion from it."""
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(1)
        cfg = world["pipeline"](
            "remote", f"mlflow.tracking_uri={uri}", "register.model_name=remote", run=False
        )
        shutil.copytree(world["good"].project.artifacts_dir, cfg.project.artifacts_dir)
        cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"experiment": "remote"})})
        reg = register(cfg)
        result = promote(cfg)
        assert result.promoted and result.champion == reg.model_version
        from headstart.cli import main

        image = next((world["data"] / "cat").glob("*.png"))
        assert (
            main(
                [
                    "predict",
                    "--model",
                    "models:/remote@champion",
                    "--set",
                    f"mlflow.tracking_uri={uri}",
                    "--json",
                    str(image),
                ]
            )
            == 0
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_no_registered_model_is_a_clear_error(world):
    cfg = world["pipeline"]("none", "register.model_name=nothing-here", run=False)
    with pytest.raises(HeadstartError, match="no registered model 'nothing-here'"):
        promote(cfg)


def test_a_crash_while_moving_aliases_leaves_exactly_one_champion(world, monkeypatch):
    from headstart.tracking import Registry

    cfg = world["pipeline"]("crash", "register.model_name=crash", run=False)
    shutil.copytree(world["bad"].project.artifacts_dir, cfg.project.artifacts_dir)
    old = register(cfg).model_version
    promote(cfg)
    shutil.rmtree(cfg.project.artifacts_dir)
    shutil.copytree(world["good"].project.artifacts_dir, cfg.project.artifacts_dir)
    new = register(cfg).model_version
    real = Registry.set_alias

    def dies_on_champion(self, alias, version):
        if alias == "champion":
            raise KeyboardInterrupt("killed between two registry calls")
        real(self, alias, version)

    monkeypatch.setattr(Registry, "set_alias", dies_on_champion)
    with pytest.raises(KeyboardInterrupt):
        promote(cfg)
    assert _aliases(cfg, "crash")["champion"] == old  # still exactly one champion: the old one
    monkeypatch.undo()
    assert promote(cfg).champion == new
    assert _aliases(cfg, "crash") == {"champion": new, "previous": old, "best": new}


def test_only_images_neither_version_trained_on_count(world):
    """A version trained with another split (here: the good run's manifest re-split with another seed)
    shares only some test images with the champion: the comparison uses just those, says how many,
    and refuses when there are fewer than promote.min_clean_images."""
    import pandas as pd

    from headstart.data.manifest import assign_splits

    cfg = world["pipeline"]("clean", "register.model_name=clean", run=False)
    shutil.copytree(world["good"].project.artifacts_dir, cfg.project.artifacts_dir)
    register(cfg)
    assert promote(cfg).promoted  # v1: the good head, seed-0 splits
    path = cfg.stage_dir("validate") / "manifest.parquet"
    m = pd.read_parquet(path)
    for seed in range(1, 100):  # a seed whose test split overlaps the old one in 2 to 4 images
        split = assign_splits(m, 0.15, 0.2, seed)
        both = int(((split == "test") & (m["split"] == "test")).sum())
        if 2 <= both <= 4:
            break
    m.assign(split=split).to_parquet(path, index=False)
    register(cfg, force=True)  # v2, the same head: what it trained on is the re-split manifest
    refused = promote(cfg)
    assert not refused.promoted and refused.reason.startswith(f"too few clean images: {both} of {len(m)}")
    assert "v2, v1" in refused.reason and "promote.min_clean_images=5" in refused.reason
    assert _aliases(cfg, "clean") == {"champion": "1", "best": "1", "challenger": "2"}

    loose = cfg.model_copy(update={"promote": cfg.promote.model_copy(update={"min_clean_images": 2})})
    result = promote(loose, version="2")
    decision = json.loads((cfg.stage_dir("promote") / "decision.json").read_text())
    assert decision["clean"] == {"n_images": both, "n_current": len(m), "versions": ["2", "1"]}
    assert decision["comparison"]["n_images"] == both and result.promoted  # the same head: difference 0
    assert (
        f"Clean evidence: {both} of {len(m)} current images"
        in (cfg.stage_dir("promote") / "summary.md").read_text()
    )


def test_a_registry_from_before_best_takes_its_champion_as_the_reference(world):
    cfg = world["pipeline"]("legacy", "register.model_name=legacy", "promote.margin=1.0", run=False)
    shutil.copytree(world["good"].project.artifacts_dir, cfg.project.artifacts_dir)
    register(cfg)
    promote(cfg)
    mlflow.MlflowClient(cfg.mlflow.tracking_uri).delete_registered_model_alias("legacy", "best")
    shutil.rmtree(cfg.project.artifacts_dir)
    shutil.copytree(world["bad"].project.artifacts_dir, cfg.project.artifacts_dir)
    register(cfg)
    worse = promote(cfg)  # promoted only because margin=1.0; the good v1 stays the reference
    assert worse.promoted and _aliases(cfg, "legacy") == {"champion": "2", "previous": "1", "best": "1"}
