"""ONNX with a dynamic batch and the preprocessing contract in its metadata; fp32 and fp16 variants;
parity with torch on real images at several batch sizes."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from headstart import HeadstartError, __version__
from headstart.atomic import write_bytes
from headstart.preprocess import InputSpec, decode, normalise, to_uint8
from headstart.runtime import Predictor

LAYOUTS = {
    "float32": "NCHW float32 RGB, resized, centre-cropped, (x/255-mean)/std",
    "uint8": "NHWC uint8 RGB (0-255), resized and centre-cropped; the graph normalises",
}


class Uint8Input(nn.Module):
    """A model that takes resized, cropped uint8 RGB in NHWC and normalises in the graph, with the
    same arithmetic as headstart.preprocess (x * (1/255/std) - mean/std)."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        std, mean = torch.tensor(spec.std).view(1, 3, 1, 1), torch.tensor(spec.mean).view(1, 3, 1, 1)
        self.register_buffer("scale", (1 / 255) / std)
        self.register_buffer("shift", mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2).float() * self.scale - self.shift)


class Fp16(nn.Module):
    """fp16 weights and compute inside, fp32 in and out: a drop-in for the fp32 model on a GPU."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def to_onnx(
    model: nn.Module,
    size: int,
    opset: int,
    output: str | list[str] = "logits",
    example: torch.Tensor | None = None,
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of an image model, with batch as a dynamic dimension."""
    model = model.eval()
    example = torch.zeros(2, 3, size, size) if example is None else example
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            raw,
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=["input"],
            output_names=[output] if isinstance(output, str) else output,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            verbose=False,
        )
        return onnx.load(raw)


def deployable(
    model: nn.Module, spec: InputSpec, input_kind: str, fp16: bool
) -> tuple[nn.Module, torch.Tensor]:
    """The module to export for one variant, and an example input of its input kind."""
    model = Fp16(model) if fp16 else model
    if input_kind == "uint8":
        return Uint8Input(model, spec).eval(), torch.zeros(2, spec.size, spec.size, 3, dtype=torch.uint8)
    return model.eval(), torch.zeros(2, 3, spec.size, spec.size)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    spec: InputSpec,
    metadata: dict[str, str],
    opset: int,
    input_kind: str = "float32",
    fp16: bool = False,
) -> Path:
    """The deployable model: to_onnx plus the preprocessing contract in its metadata."""
    module, example = deployable(model, spec, input_kind, fp16)
    proto = to_onnx(module, spec.size, opset, example=example)
    meta = {
        "headstart.version": __version__,
        "headstart.input_spec": spec.to_json(),
        "headstart.input": input_kind,
        "headstart.input_layout": LAYOUTS[input_kind],
        "headstart.precision": "fp16" if fp16 else "fp32",
        **metadata,
    }
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return write_bytes(path, proto.SerializeToString())


@dataclass(frozen=True)
class Reference:
    """What every variant's parity check compares against: the test images decoded once (uint8 and
    normalised) and torch's fp32 logits on them."""

    spec: InputSpec
    pixels: np.ndarray
    floats: np.ndarray
    logits: np.ndarray


@torch.inference_mode()
def torch_reference(model: nn.Module, paths: list[Path], spec: InputSpec) -> Reference:
    if not paths:
        raise HeadstartError("parity check needs at least one image")
    pixels = np.stack([to_uint8(decode(p, keep_grey=True), spec) for p in paths])
    floats = np.stack([normalise(a, spec) for a in pixels])
    model = model.eval().to(memory_format=torch.channels_last)  # same math, ~2x faster on a CPU
    logits = np.concatenate(
        [
            model(torch.from_numpy(floats[i : i + 32]).to(memory_format=torch.channels_last)).float().numpy()
            for i in range(0, len(paths), 32)
        ]
    )
    return Reference(spec, pixels, floats, logits)


def parity(
    model: nn.Module,
    onnx_path: str | Path,
    paths: list[Path],
    batch_sizes: tuple[int, ...] = (1, 7, 32),
    labels: list[int] | None = None,
    reference: Reference | None = None,
) -> dict:
    """Torch (fp32, the reference) vs onnxruntime on real images, at each batch size: max abs logit
    difference, top-1 agreement and, given labels, accuracy through each. `reference` (from
    torch_reference on the same paths) saves decoding and the torch pass when checking several files."""
    if not paths:
        raise HeadstartError("parity check needs at least one image")
    predictor = Predictor(onnx_path, providers=("CPUExecutionProvider",), warmup=False)
    if reference is None or reference.spec != predictor.spec or len(reference.logits) != len(paths):
        reference = torch_reference(model, paths, predictor.spec)
    pixels, floats, ours = reference.pixels, reference.floats, reference.logits
    feed = pixels if predictor.input_kind == "uint8" else floats
    y = None if labels is None else np.asarray(labels)
    per_size = {}
    for bs in batch_sizes:
        theirs = np.concatenate([predictor.logits(feed[i : i + bs]) for i in range(0, len(paths), bs)])
        per_size[str(bs)] = {
            "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
            "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
            **({} if y is None else {"accuracy_onnx": float((theirs.argmax(1) == y).mean())}),
        }
    out = {
        "n_images": len(paths),
        "batch_sizes": per_size,
        "max_abs_logit_diff": max(v["max_abs_logit_diff"] for v in per_size.values()),
        "top1_agreement": min(v["top1_agreement"] for v in per_size.values()),
        "providers": predictor.providers,
        "input": predictor.input_kind,
        "classes": predictor.classes,
    }
    if y is not None:
        out["accuracy_torch"] = float((ours.argmax(1) == y).mean())
        out["max_metric_diff"] = max(
            abs(v["accuracy_onnx"] - out["accuracy_torch"]) for v in per_size.values()
        )
    return out
