"""A Triton model repository from a registered version: <name>/config.pbtxt (onnxruntime_onnx, dynamic
batching, GPU instances), <name>/1/model.onnx, and the contract beside them (contract.json and the
config's `parameters`) with a client that applies it (triton_client.py, copied as client.py).

Triton's own ModelConfig schema checks the config when `tritonclient` is installed: its wheel ships
tritonclient/grpc/model_config_pb2.py, loaded here by path because the grpc package's __init__ needs
grpcio (whose pins clash with ours; the wheel is installed with --no-deps)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from headstart import HeadstartError
from headstart.atomic import MARKER, directory, write_json, write_text
from headstart.config import Params

VARIANTS = ("fp32", "fp16")
# a Triton model name is a folder name in the repository and a URL path segment in its API
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# ONNX element types (onnx.TensorProto) -> Triton data types; what headstart exports and a bit more
_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 10: "TYPE_FP16"}
_CLIENT = Path(__file__).with_name("triton_client.py")


@dataclass
class Exported:
    path: Path  # the model's folder, DIR/<name>
    schema: str  # how the config was checked, in words


@dataclass
class Tensor:
    name: str
    dtype: str  # Triton's TYPE_*
    dims: list[int]  # without the batch dimension; -1 where the graph leaves a size open


def export_triton(
    uri: str,
    params: Params,
    out: str | Path,
    name: str | None = None,
    variant: str = "fp32",
    max_batch_size: int = 32,
    tensorrt: bool = False,
) -> Exported:
    """Write out/<name>/ for the registered version `uri` whole, or nothing (a missing alias, a version
    without that ONNX file, a folder we did not write all fail before anything is written)."""
    from headstart.tracking import downloaded_model

    name = name or _registered_name(uri)
    target = Path(out) / _check_name(name)
    if variant not in VARIANTS:
        raise HeadstartError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if max_batch_size < 1:
        raise HeadstartError(f"--max-batch-size {max_batch_size}: Triton's dynamic batching needs at least 1")
    _check_target(target)
    with downloaded_model(uri, params, variant) as onnx_file:
        model = _load(onnx_file, uri)
    meta = contract_metadata(model, uri)
    text = config_text(name, model, max_batch_size, tensorrt, meta)
    schema = check_config(text, model, uri)
    with directory(target) as tmp:
        _save(model, tmp / "1" / "model.onnx")
        write_text(tmp / "config.pbtxt", text)
        write_json(tmp / "contract.json", meta)
        write_text(tmp / "client.py", _CLIENT.read_text())
    return Exported(target, schema)


def _registered_name(uri: str) -> str:
    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise HeadstartError(f"--model {uri!r}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    return re.split(r"[@/]", rest, maxsplit=1)[0]


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise HeadstartError(
            f"Triton model name {name!r}: use letters, digits, '_', '.', '-' (at most 128, starting with a "
            "letter or digit); choose one with --name"
        )
    return name


def _check_target(target: Path) -> None:
    """The one folder this writes is replaced whole, so it must be ours (MARKER) or empty."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise HeadstartError(f"{target} is not a folder; move it away or choose another --out or --name")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).exists():
        raise HeadstartError(
            f"{target} holds files headstart did not write (no {MARKER}); move it away or choose another "
            "--out or --name"
        )


def _load(path: Path, uri: str):
    """The ONNX model with any external data (MLflow's onnx flavour saves weights beside it) inside."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise HeadstartError(f"{uri}: {path.name} is not a loadable ONNX model ({exc})") from None


def _save(model, path: Path) -> None:
    """One self-contained file below protobuf's 2 GB limit, else the weights beside it (Triton's
    onnxruntime backend loads both from the version folder)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 2**31 - 2**20
    onnx.save(model, str(path), save_as_external_data=big, location="model.onnx.data" if big else None)


def contract_metadata(model, source: str) -> dict[str, str]:
    """The model's metadata (classes, input spec, abstention rule: the contract), checked by the same
    reader Predictor uses, so a repository is never written for a model no client could apply."""
    from headstart.runtime import Contract

    meta = {p.key: p.value for p in model.metadata_props}
    Contract.from_metadata(source, meta)
    return meta


def graph_tensors(model, batched: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's real inputs (initializers are not) and outputs as Triton sees them: with
    `batched`, the first dimension is Triton's batch and must be left open by the graph."""
    init = {t.name for t in model.graph.initializer}
    ins = [_tensor(v, batched) for v in model.graph.input if v.name not in init]
    return ins, [_tensor(v, batched) for v in model.graph.output]


def _tensor(value, batched: bool) -> Tensor:
    t = value.type.tensor_type
    if t.elem_type not in _DTYPES:
        raise HeadstartError(f"graph tensor {value.name!r} has ONNX element type {t.elem_type}: not mapped")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    if batched and (not dims or dims[0] != -1):
        raise HeadstartError(
            f"graph tensor {value.name!r} has shape {dims}: its first (batch) dimension is fixed, so Triton "
            "cannot batch it; export the model again (headstart exports a dynamic batch)"
        )
    return Tensor(value.name, _DTYPES[t.elem_type], dims[1:] if batched else dims)


def config_text(name: str, model, max_batch_size: int, tensorrt: bool, meta: dict[str, str]) -> str:
    """config.pbtxt in protobuf text format: names, types and dims from the graph."""
    ins, outs = graph_tensors(model)
    lines = [f"name: {_q(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    lines += [_block("input", t) for t in ins] + [_block("output", t) for t in outs]
    # a short queue delay lets concurrent requests share one batch without holding a lone one long
    lines += ["dynamic_batching { max_queue_delay_microseconds: 500 }"]
    lines += ["instance_group [ { count: 1 kind: KIND_GPU } ]"]
    if tensorrt:
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator [ {",
            '  name: "tensorrt"',
            '  parameters { key: "precision_mode" value: "FP16" }',
            "} ] } }",
        ]
    lines += [f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}" for k, v in meta.items()]
    return "\n".join(lines) + "\n"


def _block(kind: str, t: Tensor) -> str:
    if not t.dims:  # one value per image (ood_score [N]): Triton wants dims [1] reshaped to []
        return f"{kind} [ {{ name: {_q(t.name)} data_type: {t.dtype} dims: [1] reshape: {{ shape: [] }} }} ]"
    return f"{kind} [ {{ name: {_q(t.name)} data_type: {t.dtype} dims: {t.dims} }} ]"


def _q(text: str) -> str:
    """A protobuf text-format string literal (quotes, backslashes, control characters escaped)."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text.encode("utf-8", "surrogateescape"), as_utf8=True) + '"'


@cache
def model_config_schema():
    """Triton's model_config_pb2 module from the tritonclient wheel, or None when it is not installed."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("headstart_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(text: str):
    """config.pbtxt as Triton's ModelConfig message; an unknown field or a wrong type raises."""
    from google.protobuf import text_format

    schema = model_config_schema()
    if schema is None:
        raise HeadstartError("tritonclient is not installed: pip install --no-deps tritonclient")
    return text_format.Parse(text, schema.ModelConfig())


def check_config(text: str, model, source: str) -> str:
    """Check `text` against Triton's schema and the graph when tritonclient is installed; say which."""
    from google.protobuf import text_format

    if model_config_schema() is None:
        return "not checked against Triton's schema: pip install --no-deps tritonclient to check it"
    try:
        config = parse_config(text)
    except text_format.ParseError as exc:
        raise HeadstartError(
            f"{source}: the config does not fit Triton's ModelConfig schema ({exc})"
        ) from None
    ins, outs = graph_tensors(model)
    _same(source, "input", config.input, ins)
    _same(source, "output", config.output, outs)
    return "checked against Triton's ModelConfig schema and the ONNX graph"


def _same(source: str, kind: str, declared, graph: list[Tensor]) -> None:
    schema = model_config_schema()
    got = [
        (
            t.name,
            schema.DataType.Name(t.data_type),
            list(t.reshape.shape if t.HasField("reshape") else t.dims),
        )
        for t in declared
    ]
    want = [(t.name, t.dtype, t.dims) for t in graph]
    if got != want:
        raise HeadstartError(f"{source}: config {kind} {got} disagrees with the ONNX graph's {want}")


def config_json(text: str) -> dict:
    """The config as Triton's HTTP API returns it (GET v2/models/<name>/config), for tests and tools."""
    from google.protobuf import json_format

    return json_format.MessageToDict(parse_config(text), preserving_proto_field_name=True)
