"""Export by grafting: the frozen backbone's ONNX graph, which the feature engine already caches
(headstart.features.backbone_onnx), composed with small graphs built here for the rest of the shipped
model (the uint8 input's normalisation, the head, the feature gate's ood_score) instead of tracing the
whole model through the dynamo exporter again. The pieces are written with onnx.helper for the layers
a headstart head is made of (a dynamo export of even a 2-layer head costs 2-7 s of fixed overhead);
any other head goes through the exporter on its own, still without the backbone. fp16 is the composed
graph converted (onnxruntime's float16 converter), fp32 in and out, the gate's score kept in fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper
from torch import nn

from headstart import HeadstartError
from headstart.calibration import OOD_OUTPUT, FeatureGate
from headstart.preprocess import InputSpec

FEATURES = "features"  # the cached backbone graph's output
log = logging.getLogger(__name__)


class GraftRefused(HeadstartError):
    """The cached backbone graph cannot take this model's head: the full export runs instead."""


def graft_source(model, cache_dir: str | Path | None, opset: int, gate: FeatureGate | None) -> tuple:
    """(the checked backbone graph to graft onto, or None; how the model is built and why) for a model
    of headstart.models. Only a head on the pretrained backbone is grafted: a fine-tuned or from-scratch
    backbone is no cached frozen graph, so it gets the full export."""
    kind = getattr(model, "kind", "custom")
    if kind != "head":
        return None, f"full export: a {kind} model, not a head on a frozen backbone"
    if cache_dir is None:
        return None, "full export: no feature cache to graft from"
    from headstart.features import backbone_onnx

    path = backbone_onnx(model.backbone, cache_dir, opset)  # rebuilt there when its sha256 is off
    try:
        check_graft(onnx.load(path), model.backbone, model.head, gate, opset)
    except GraftRefused as exc:
        log.warning("%s; running the full export instead", exc)
        return None, f"full export: {exc}"
    return path, f"grafted onto the cached backbone graph {path.name}"


def check_graft(
    backbone_graph: onnx.ModelProto, backbone, head: nn.Module, gate: FeatureGate | None, opset: int
) -> None:
    """Refuse a backbone graph that is not this backbone's (engine key, weights digest) or whose
    feature width the head (or the gate) does not take."""
    from headstart.features import ENGINE_KEY, WEIGHTS_KEY, engine_key

    meta = {p.key: p.value for p in backbone_graph.metadata_props}
    if meta.get(WEIGHTS_KEY) != backbone.weights_sha256:
        raise GraftRefused(
            f"the cached backbone graph was exported from weights {meta.get(WEIGHTS_KEY)!r}, not this "
            f"model's {backbone.weights_sha256}"
        )
    if meta.get(ENGINE_KEY) != engine_key(backbone, opset):
        raise GraftRefused(f"the cached backbone graph's key {meta.get(ENGINE_KEY)!r} is not this backbone's")
    width = graph_width(backbone_graph)
    wanted = {"head": head_width(head), "feature gate": None if gate is None else gate.means.shape[1]}
    for who, w in wanted.items():
        if w is not None and w != width:
            raise GraftRefused(f"the {who} takes {w} features but the cached backbone graph gives {width}")


def graph_width(proto: onnx.ModelProto) -> int:
    out = next((o for o in proto.graph.output if o.name == FEATURES), None)
    dims = [] if out is None else out.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].dim_value:
        raise GraftRefused(f"the cached backbone graph has no '{FEATURES}' output of shape (batch, width)")
    return dims[1].dim_value


def head_width(head: nn.Module) -> int | None:
    """The feature width the head's first layer takes (None: not a layer that says)."""
    first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    return None if first is None else first.in_features


def grafted(
    backbone_graph: onnx.ModelProto,
    head: nn.Module,
    spec: InputSpec,
    input_kind: str,
    fp16: bool,
    gate: FeatureGate | None,
) -> onnx.ModelProto:
    """The deployable graph (input "input"; outputs logits and, with `gate`, ood_score), composed:
    [uint8 normalisation] -> backbone -> head [and the gate's score on the same features]."""
    opset = next(o.version for o in backbone_graph.opset_import if o.domain in ("", "ai.onnx"))
    width = graph_width(backbone_graph)
    model = _merge(backbone_graph, head_graph(head, width, opset, backbone_graph.ir_version), "head/")
    if fp16:
        model = to_fp16(model)
    if gate is not None:
        model = _merge(model, ood_graph(gate, opset, model.ir_version), "ood/", keep=["logits"])
    if input_kind == "uint8":
        pre = _prefixed(uint8_graph(spec, opset, model.ir_version), "pre/", rename_inputs=False)
        model = compose.merge_models(pre, model, io_map=[("input_nchw", "input")])
    outputs = [o for o in model.graph.output if o.name != FEATURES]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    # merge_models appends each side's opset imports: one per domain, as tools that read the model
    # (onnxruntime's quantizer) require
    versions: dict[str, int] = {}
    for o in model.opset_import:
        versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())
    return model


def _merge(first: onnx.ModelProto, second: onnx.ModelProto, prefix: str, keep: list[str] | None = None):
    """`second` (input "x") fed by `first`'s features; `first`'s features stay an output for what
    comes after (the gate) unless `keep` names the outputs to carry."""
    second = _prefixed(second, prefix, rename_inputs=True)
    carried = keep if keep is not None else [o.name for o in first.graph.output]
    outputs = [*carried, *(o.name for o in second.graph.output)]
    return compose.merge_models(first, second, io_map=[(FEATURES, f"{prefix}x")], outputs=outputs)


def _prefixed(model: onnx.ModelProto, prefix: str, rename_inputs: bool) -> onnx.ModelProto:
    return compose.add_prefix(model, prefix, rename_inputs=rename_inputs, rename_outputs=False)


def _model(nodes, inputs, outputs, inits, opset: int, ir_version: int) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(a, n) for n, a in inits]
    graph = helper.make_graph(nodes, "piece", inputs, outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version  # merge_models wants both sides alike
    return model


def _batch(name: str, dtype: int, *dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, ["batch", *dims])


def head_graph(head: nn.Module, width: int, opset: int, ir_version: int) -> onnx.ModelProto:
    """features "x" (batch, width) -> "logits": Gemm and Relu for a head of Linear, ReLU, Dropout
    (identity in eval) and Identity layers; any other head through the dynamo exporter."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    if not all(isinstance(m, nn.Linear | nn.ReLU | nn.Dropout | nn.Identity) for m in layers):
        return _exported_head(head, width, opset)
    nodes, inits, x = [], [], "x"
    for i, m in enumerate(layers):
        if isinstance(m, nn.Linear):
            w = m.weight.detach().float().numpy()
            b = np.zeros(len(w), np.float32) if m.bias is None else m.bias.detach().float().numpy()
            inits += [(f"w{i}", w), (f"b{i}", b)]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
        elif isinstance(m, nn.ReLU):
            nodes.append(helper.make_node("Relu", [x], [f"y{i}"]))
        else:
            continue
        x = f"y{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    n_out = next(m.out_features for m in reversed(layers) if isinstance(m, nn.Linear))
    io = [_batch("x", TensorProto.FLOAT, width)], [_batch("logits", TensorProto.FLOAT, n_out)]
    return _model(nodes, *io, inits, opset, ir_version)


def _exported_head(head: nn.Module, width: int, opset: int) -> onnx.ModelProto:
    from headstart.export import to_onnx

    proto = to_onnx(head, 0, opset, "logits", example=torch.zeros(2, width))
    old = proto.graph.input[0].name
    proto.graph.input[0].name = "x"  # what _merge connects the features to
    for node in proto.graph.node:
        node.input[:] = ["x" if i == old else i for i in node.input]
    return proto


def ood_graph(gate: FeatureGate, opset: int, ir_version: int) -> onnx.ModelProto:
    """features "x" -> ood_score, export.OodScore's arithmetic in fp32: r = unit(x) - means,
    p = r @ basis, min over classes of (p*p) @ weights + |r|^2 / sigma2."""
    f32 = np.float32
    inits = [
        ("means", gate.means.astype(f32)),
        ("basis", gate.basis.astype(f32)),
        ("weights", gate.weights.astype(f32)),
        ("inv_sigma2", np.array(1.0 / gate.sigma2, f32)),
        ("eps", np.array(1e-12, f32)),
        ("axis1", np.array([1], np.int64)),
        ("last", np.array([-1], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        _reduce("ReduceL2", "x", "norm", 1, opset, keepdims=1),
        n("Max", ["norm", "eps"], ["norm_c"]),
        n("Div", ["x", "norm_c"], ["u"]),
        n("Unsqueeze", ["u", "axis1"], ["u3"]),
        n("Sub", ["u3", "means"], ["r"]),
        n("MatMul", ["r", "basis"], ["p"]),
        n("Mul", ["p", "p"], ["p2"]),
        n("MatMul", ["p2", "weights"], ["maha"]),
        n("Mul", ["r", "r"], ["r2"]),
        n("ReduceSum", ["r2", "last"], ["rr"], keepdims=0),
        n("Mul", ["rr", "inv_sigma2"], ["iso"]),
        n("Add", ["maha", "iso"], ["s"]),
        _reduce("ReduceMin", "s", OOD_OUTPUT, 1, opset, keepdims=0),
    ]
    io = [_batch("x", TensorProto.FLOAT, gate.means.shape[1])], [_batch(OOD_OUTPUT, TensorProto.FLOAT)]
    return _model(nodes, *io, inits, opset, ir_version)


def _reduce(op: str, x: str, out: str, axis: int, opset: int, keepdims: int) -> onnx.NodeProto:
    """ReduceL2/ReduceMin over `axis`: an input from opset 18 ("axis1"), an attribute before it."""
    if opset >= 18:
        return helper.make_node(op, [x, f"axis{axis}"], [out], keepdims=keepdims)
    return helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims)


def uint8_graph(spec: InputSpec, opset: int, ir_version: int) -> onnx.ModelProto:
    """uint8 NHWC "input" -> normalised float NCHW, export.Uint8Input's arithmetic."""
    c, s = spec.channels, spec.size
    std = np.array(spec.std, np.float32).reshape(1, c, 1, 1)
    mean = np.array(spec.mean, np.float32).reshape(1, c, 1, 1)
    inits = [("scale", (np.float32(1 / 255) / std).astype(np.float32)), ("shift", mean / std)]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "shift"], ["input_nchw"]),
    ]
    io = [_batch("input", TensorProto.UINT8, s, s, c)], [_batch("input_nchw", TensorProto.FLOAT, c, s, s)]
    return _model(nodes, *io, inits, opset, ir_version)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs and outputs (the features output too: the gate reads
    them in fp32, as export.Fp16 does)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True)
    _sort_nodes(model.graph)  # the converter appends its input casts last; the ONNX checker objects
    return model


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Nodes in topological order, otherwise in their given order."""
    ready = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    todo, done = list(graph.node), []
    while todo:
        left = []
        for node in todo:
            if all(i in ready for i in node.input):
                done.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(todo):
            raise GraftRefused(f"the composed graph has a cycle or a dangling input at {left[0].name}")
        todo = left
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in done]
    del graph.node[:]
    graph.node.extend(nodes)
