"""The INT8 variant: onnxruntime's static quantization (QDQ, per-channel int8 weights, uint8
activations: the recommended setting for x86 CPUs) of the fp32 ONNX file, calibrated on a sample of
training images preprocessed by the model's own contract. Only the convolutional trunk is quantized:
the head and the feature gate's score stay fp32 (a few small matmuls, and the score meets a threshold)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pandas as pd

from headstart import HeadstartError
from headstart.atomic import write_bytes
from headstart.runtime import Contract

CALIBRATION_BATCH = 16  # images per calibration run: bounded memory, few session calls


def calibration_images(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """A deterministic sample of `n` training images (by content hash: the same data, the same sample)."""
    train = frame[frame["split"] == "train"].sort_values("sha256")
    return train.head(n).reset_index(drop=True)


def calibration_batches(contract: Contract, paths: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    """The images as the model's input, in batches; files that fail to decode are skipped and named."""
    loaded, skipped = [], []
    for p in paths:
        try:
            loaded.append(contract.load(p))
        except Exception as exc:  # unreadable, truncated, changed since validate: counted, not fatal
            skipped.append(f"{Path(p).name}: {type(exc).__name__}")
    batches = [np.stack(loaded[i : i + CALIBRATION_BATCH]) for i in range(0, len(loaded), CALIBRATION_BATCH)]
    return batches, skipped


def trunk_nodes(proto: onnx.ModelProto) -> list[str]:
    """The nodes whose outputs are all 4-D (N,C,H,W): the convolutional trunk up to the pooling."""
    graph = onnx.shape_inference.infer_shapes(proto).graph
    rank = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.value_info, *graph.input, *graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    return [n.name for n in proto.graph.node if n.output and all(rank.get(o) == 4 for o in n.output)]


def quantize_int8(fp32: str | Path, out: str | Path, paths: list[Path]) -> dict:
    """`out`: the fp32 model statically quantized, calibrated on `paths`, with fp32's metadata (the
    contract, the abstention rule) and outputs (logits, ood_score). Returns the calibration's counts."""
    proto = onnx.load(fp32)
    meta = {p.key: p.value for p in proto.metadata_props}
    batches, skipped = calibration_batches(Contract.from_metadata(fp32, meta), paths)
    if not batches:
        raise HeadstartError(
            f"int8 calibration: none of the {len(paths)} training images decoded ({'; '.join(skipped[:3])}); "
            "run prepare and validate again, or set export.int8: false"
        )
    with tempfile.TemporaryDirectory(prefix="headstart-int8-") as tmp:
        feeds = ({proto.graph.input[0].name: b} for b in batches)
        _quantize(Path(fp32), Path(tmp) / "int8.onnx", feeds, trunk_nodes(proto))
        quantized = onnx.load(Path(tmp) / "int8.onnx")
    if [o.name for o in quantized.graph.output] != [o.name for o in proto.graph.output]:
        raise HeadstartError(f"{out}: quantization changed the model's outputs; report this as a bug")
    onnx.helper.set_model_props(quantized, {**meta, "headstart.precision": "int8"})
    onnx.checker.check_model(quantized)
    write_bytes(out, quantized.SerializeToString())
    return {"calibration_images": sum(len(b) for b in batches), "calibration_skipped": skipped}


def _quantize(fp32: Path, out: Path, feeds: Iterator[dict], nodes: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(feeds, None)

    with _quiet_preprocess_hint():
        quantize_static(
            str(fp32),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
        )


class _quiet_preprocess_hint:
    """quantize_static logs a hint to run its pre-processing (shape inference, which trunk_nodes has
    done; graph optimisation, which the dynamo export and the session do) on the root logger, every call."""

    def __enter__(self):
        self.filter = lambda record: "pre-processing before quantization" not in record.getMessage()
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self.filter)
