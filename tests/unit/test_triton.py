"""export-triton: a registered version becomes a Triton model repository whose config.pbtxt Triton's own
ModelConfig schema accepts (tritonclient's model_config_pb2) with dims and dtypes read from the graph,
and whose client answers as Predictor does. Triton itself is not run here (no GPU, no container): a
stand-in for tritonclient.http runs the written 1/model.onnx with onnxruntime, as Triton's onnxruntime
backend would, from the config the written config.pbtxt turns into on Triton's HTTP API."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from PIL import Image

from headstart import HeadstartError
from headstart.atomic import MARKER
from headstart.cli import main
from headstart.config import load_params
from headstart.preprocess import InputSpec
from headstart.runtime import Predictor
from headstart.tracking import Registry, log_pipeline_run
from headstart.triton import check_config, config_json, config_text, export_triton, parse_config
from tests.unit.test_hostile_runtime import CLASSES, tiny_onnx

SPEC = InputSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def uint8_onnx(path: Path, batch: str | int = "batch") -> Path:
    """A headstart-shaped uint8 model: N,S,S,3 bytes -> channel means -> logits N,3."""
    nodes = [
        helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_uint8",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, [batch, 16, 16, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
            onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32) / 10, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    props = {"headstart.classes": json.dumps(CLASSES), "headstart.input_spec": SPEC.to_json()}
    helper.set_model_props(model, {**props, "headstart.input": "uint8"})
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root, rng = tmp_path_factory.mktemp("triton_imgs"), np.random.default_rng(0)
    out = []
    for i, colour in enumerate(
        [(220, 10, 10), (10, 200, 20), (20, 20, 210), (120, 120, 110), (200, 190, 10)]
    ):
        arr = np.clip(np.array(colour) + rng.normal(0, 20, (30 + i, 40, 3)), 0, 255).astype(np.uint8)
        out.append(root / f"{i}.png")
        Image.fromarray(arr).save(out[-1])
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One sqlite store: version 1 of `tiny` (fp32 + an fp16 file) holding `champion`, and version 2,
    whose artifacts hold no ONNX file."""
    root = tmp_path_factory.mktemp("registry")
    cfg = load_params(
        None,
        [
            f"project.artifacts_dir={root / 'artifacts'}",
            f"project.cache_dir={root / 'cache'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"mlflow.artifact_location={root / 'mlruns'}",
            "register.model_name=tiny",
        ],
    )
    fp32 = tiny_onnx(root / "model.onnx")
    (root / "variants").mkdir()
    fp16 = tiny_onnx(root / "variants" / "model_fp16.onnx", meta={"headstart.precision": "fp16"})
    report = root / "report.json"
    report.write_text("{}")
    made = log_pipeline_run(cfg, {"test_accuracy": 1.0}, {"evaluate": report}, fp32, {}, [], [fp16], CLASSES)
    reg = Registry(cfg, "tiny")
    reg.set_alias("champion", made["model_version"])
    run_id = made["run_id"]
    reg.client.log_text(run_id, "not a model", "notes/readme.txt")
    reg.client.create_model_version("tiny", f"runs:/{run_id}/notes", run_id=run_id)
    return cfg, fp32


class FakeHttp:
    """tritonclient.http's API as the client uses it, serving a written repository with onnxruntime."""

    def __init__(self, repo: Path):
        self.repo, self.calls = repo, []

    def InferenceServerClient(self, url):  # noqa: N802 (tritonclient's name)
        return self

    def get_model_config(self, model):
        return config_json((self.repo / model / "config.pbtxt").read_text())

    class InferInput:
        def __init__(self, name, shape, datatype):
            self.name, self.shape, self.datatype = name, shape, datatype

        def set_data_from_numpy(self, arr):  # tritonclient refuses a dtype or shape that disagrees
            assert {"FP32": np.float32, "UINT8": np.uint8}[self.datatype] == arr.dtype
            assert list(arr.shape) == self.shape
            self.data = arr

    class InferRequestedOutput:
        def __init__(self, name):
            self.name = name

    def infer(self, model, inputs, outputs):
        config = self.get_model_config(model)
        assert all(i.shape[0] <= config["max_batch_size"] for i in inputs)
        session = ort.InferenceSession(str(self.repo / model / "1" / "model.onnx"))
        got = session.run([o.name for o in outputs], {i.name: i.data for i in inputs})
        self.calls.append(len(inputs[0].data))
        return type("Result", (), {"as_numpy": lambda _, name: got[[o.name for o in outputs].index(name)]})()


def client_module(folder: Path):
    spec = importlib.util.spec_from_file_location("written_triton_client", folder / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["float32", "uint8"])
@pytest.mark.parametrize("tensorrt", [False, True])
def test_config_fits_tritons_schema_with_the_graphs_names_dims_and_dtypes(tmp_path, kind, tensorrt):
    path = tiny_onnx(tmp_path / "m.onnx") if kind == "float32" else uint8_onnx(tmp_path / "m.onnx")
    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    config = parse_config(config_text("tiny", model, 8, tensorrt, meta))  # unknown fields would raise
    assert (config.name, config.platform, config.max_batch_size) == ("tiny", "onnxruntime_onnx", 8)
    dtype, dims = ("TYPE_FP32", [3, 224, 224]) if kind == "float32" else ("TYPE_UINT8", [16, 16, 3])
    schema = type(config).DESCRIPTOR.file.enum_types_by_name["DataType"]
    assert [(i.name, schema.values_by_number[i.data_type].name, list(i.dims)) for i in config.input] == [
        ("input", dtype, dims)
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3])]
    assert config.HasField("dynamic_batching") and config.instance_group[0].kind == 1  # KIND_GPU
    assert {k: v.string_value for k, v in config.parameters.items()} == meta
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(a.name, dict(a.parameters)) for a in accelerators] == (
        [("tensorrt", {"precision_mode": "FP16"})] if tensorrt else []
    )


def test_the_schema_and_the_graph_check_can_fail(tmp_path):
    model = onnx.load(tiny_onnx(tmp_path / "m.onnx"))
    with pytest.raises(text_format.ParseError, match="max_batch"):
        parse_config('name: "x" max_batch: 4')
    text = config_text("x", model, 4, False, {})
    with pytest.raises(HeadstartError, match="disagrees with the ONNX graph"):
        check_config(text.replace("dims: [3, 224, 224]", "dims: [3, 32, 32]"), model, "m.onnx")
    with pytest.raises(HeadstartError, match="fits|schema"):
        check_config(text.replace("KIND_GPU", "KIND_TPU"), model, "m.onnx")
    fixed = onnx.load(uint8_onnx(tmp_path / "fixed.onnx", batch=1))
    with pytest.raises(HeadstartError, match="first \\(batch\\) dimension is fixed"):
        config_text("x", fixed, 4, False, {})


def test_champion_becomes_a_repository_whose_client_answers_as_predictor(registry, images, tmp_path, capsys):
    cfg, fp32 = registry
    out = tmp_path / "repo"
    code = main(
        ["export-triton", "--model", "models:/tiny@champion", "--out", str(out), "--max-batch-size", "2"]
        + ["--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]
    )
    assert code == 0 and "checked against Triton's ModelConfig schema" in capsys.readouterr().out
    folder = out / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["1", "config.pbtxt", "contract.json", "client.py", MARKER]
    )
    assert [p.name for p in (folder / "1").iterdir()] == ["model.onnx"]  # weights inside, not beside
    meta = json.loads((folder / "contract.json").read_text())
    assert json.loads(meta["headstart.classes"]) == CLASSES and "headstart.precision" not in meta

    fake = FakeHttp(out)
    answers = client_module(folder).classify([str(p) for p in images], "tiny", http=fake)
    assert fake.calls == [2, 2, 1]  # batches of the config's max_batch_size
    expected = Predictor(fp32, providers="cpu").predict_files(images)
    assert [a["path"] for a in answers] == [p.path for p in expected]
    for a, e in zip(answers, expected, strict=True):
        assert (a["label"], a["abstain"], a["reason"]) == (e.label, e.abstain, e.reason)
        assert a["confidence"] == pytest.approx(e.confidence, abs=1e-6)
    _client_needs_neither_torch_nor_mlflow(
        folder, fake.get_model_config("tiny"), images[0], answers[0], tmp_path
    )


def _client_needs_neither_torch_nor_mlflow(folder: Path, config: dict, image: Path, answer: dict, tmp: Path):
    """The written client.py, with torch and mlflow unimportable, makes the same answer."""
    (tmp / "config.json").write_text(json.dumps(config))
    script = (
        "import sys, json, importlib.util; sys.modules['torch'] = None; sys.modules['mlflow'] = None\n"
        "import onnxruntime as ort\n"
        f"spec = importlib.util.spec_from_file_location('client', {str(folder / 'client.py')!r})\n"
        "client = importlib.util.module_from_spec(spec); spec.loader.exec_module(client)\n"
        f"contract = client.contract_from_config(json.load(open({str(tmp / 'config.json')!r})))\n"
        f"session = ort.InferenceSession({str(folder / '1' / 'model.onnx')!r})\n"
        f"logits = session.run(None, {{'input': contract.load({str(image)!r})[None]}})[0]\n"
        "print(contract.decide(logits)[0]['label'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == answer["label"]


def test_the_client_reports_an_unreadable_file_and_answers_the_rest(tmp_path, images):
    out = tmp_path / "repo" / "u8"
    out.mkdir(parents=True)
    path = uint8_onnx(tmp_path / "m.onnx")
    model = onnx.load(path)
    (out / "1").mkdir()
    (out / "1" / "model.onnx").write_bytes(path.read_bytes())
    (out / "config.pbtxt").write_text(
        config_text("u8", model, 4, False, {p.key: p.value for p in model.metadata_props})
    )
    (out / "client.py").write_text((Path(__file__).parents[2] / "headstart" / "triton_client.py").read_text())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    answers = client_module(out).classify(
        [str(images[0]), str(bad), str(images[2])], "u8", http=FakeHttp(out.parent)
    )
    assert "error" in answers[1] and "label" not in answers[1]
    expected = Predictor(path, providers="cpu").predict_files([images[0], images[2]])
    assert [answers[0]["label"], answers[2]["label"]] == [e.label for e in expected]


def test_fp16_file_and_tensorrt_accelerator(registry, tmp_path):
    cfg, _ = registry
    done = export_triton("models:/tiny/1", cfg, tmp_path, name="tiny-fp16", variant="fp16", tensorrt=True)
    assert json.loads((done.path / "contract.json").read_text())["headstart.precision"] == "fp16"
    model = onnx.load(done.path / "1" / "model.onnx")
    assert {p.key: p.value for p in model.metadata_props}["headstart.precision"] == "fp16"
    config = parse_config((done.path / "config.pbtxt").read_text())
    assert config.name == "tiny-fp16"
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("models:/tiny@nosuch", "nosuch"),
        ("models:/tiny/2", "no (artifacts/)?model.onnx in the model.s artifacts"),
        ("models:/nosuch@champion", "nosuch"),
    ],
)
def test_a_missing_alias_or_onnx_file_is_one_line_and_writes_nothing(registry, tmp_path, uri, match):
    cfg, _ = registry
    with pytest.raises(HeadstartError, match=match) as err:
        export_triton(uri, cfg, tmp_path / "repo")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_a_folder_we_did_not_write_is_kept_and_ours_is_replaced(registry, tmp_path):
    cfg, _ = registry
    theirs = tmp_path / "tiny"
    theirs.mkdir()
    (theirs / "config.pbtxt").write_text("theirs")
    with pytest.raises(HeadstartError, match="headstart did not write"):
        export_triton("models:/tiny@champion", cfg, tmp_path)
    assert [p.name for p in theirs.iterdir()] == ["config.pbtxt"]
    assert (theirs / "config.pbtxt").read_text() == "theirs"
    first = export_triton("models:/tiny@champion", cfg, tmp_path / "repo")
    (first.path / "stale.txt").write_text("left by an older export")
    again = export_triton("models:/tiny@champion", cfg, tmp_path / "repo", max_batch_size=4)
    assert not (again.path / "stale.txt").exists()
    assert parse_config((again.path / "config.pbtxt").read_text()).max_batch_size == 4
    with pytest.raises(HeadstartError, match="Triton model name"):
        export_triton("models:/tiny@champion", cfg, tmp_path / "repo", name="../up")


def test_serve_runs_mlflows_scoring_server_on_the_projects_store(registry, monkeypatch, capsys):
    cfg, _ = registry
    ran = {}
    monkeypatch.setattr("os.execve", lambda exe, argv, env: ran.update(argv=argv, env=env))
    store = ["--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", "--set", "register.model_name=tiny"]
    assert main(["serve", *store, "--port", "5123"]) == 0
    assert ran["argv"][1:] == [
        "-m", "mlflow", "models", "serve", "-m", "models:/tiny@champion", "--env-manager", "local",
        "--host", "127.0.0.1", "--port", "5123", "--workers", "1",
    ]  # fmt: skip
    assert ran["env"]["MLFLOW_TRACKING_URI"] == cfg.mlflow.tracking_uri
    # MLflow execs `uvicorn` through a shell: the venv's bin must lead PATH
    assert ran["env"]["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    ran.clear()
    capsys.readouterr()
    for missing in ("models:/tiny@nosuch", "models:/tiny/9", "models:/nosuch@champion"):
        assert main(["serve", *store, "--model", missing]) == 2 and not ran
        err = capsys.readouterr().err
        assert err.startswith("headstart: error: ") and err.count("\n") == 1, err


def test_serve_means_models_and_schedule_means_the_flow(tmp_path, monkeypatch, capsys):
    from headstart import cli

    assert cli._parser().parse_args(["schedule", "--cron", "* * * * *"]).func is cli._schedule
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--cron", "* * * * *"])  # the old meaning is gone
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("os.execve", lambda *a: pytest.fail("started a server without a store"))
    assert main(["serve"]) == 2
    assert "no MLflow store at sqlite:///mlflow.db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
