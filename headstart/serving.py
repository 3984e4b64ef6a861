"""The registry's serving model: an MLflow pyfunc that takes encoded images (a `binary` column `image`:
base64 in `dataframe_split` JSON, raw bytes in parquet) and answers with the contract's decision
through the torch-free headstart.runtime.Predictor, so `mlflow models serve` preprocesses and abstains
exactly as `headstart predict` does.

This module IS the MLflow flavour, so it imports mlflow.pyfunc (an exception to "only tracking.py
imports mlflow": it runs inside MLflow's scoring server); tracking.py logs it (models from code,
MODEL_CODE), and nothing else in the library imports it.

Bad input never costs the server: a request with a row that is not image bytes, empty, truncated,
not an image or a decompression bomb, or with more than `max_images` rows, is refused as a whole with
HTTP 400 and one line naming the first bad row; work per request is bounded by that cap, decoding
runs `batch_size` images at a time and each image by preprocess.MAX_PIXELS."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

COLUMN = "image"
# model_config defaults (register.serving in params.yaml; SERVING_MODEL_CONFIG overrides at serve time)
DEFAULTS = {"max_images": 256, "batch_size": 32, "variant": "fp32", "providers": None}

# the file logged as the model's code (models from code: MLflow refuses pickled models by default)
MODEL_CODE = """from mlflow.models import set_model

from headstart.serving import ImageClassifier

set_model(ImageClassifier())
"""


class BadRequest(MlflowException):
    """A refused request: HTTP 400 with this one line. MLflow's server prefixes a prediction error
    with the request's DataFrame (a many-line repr of the images' bytes); the setter keeps the first
    message, so the client reads the reason and nothing else."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.__dict__["_line"]

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_line", value)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Encoded images in, per image: label, confidence, probabilities, abstain, reason."""

    def load_context(self, context) -> None:
        from headstart.runtime import Predictor

        config = {**DEFAULTS, **(context.model_config or {})}
        self.max_images, self.batch_size = int(config["max_images"]), int(config["batch_size"])
        model = context.artifacts.get(config["variant"])
        if model is None:
            raise MlflowException(
                f"model_config variant {config['variant']!r}: this version has {sorted(context.artifacts)}"
            )
        # CPU, or the GPU providers this serving machine can load (Predictor asks the system first)
        self.predictor = Predictor(model, providers=config["providers"] or None, warmup=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict]:
        blobs = images_of(model_input, self.max_images)
        abstain = bool((params or {}).get("abstain", True))
        results = self.predictor.predict_bytes(blobs, self.batch_size, workers=4, abstain=abstain)
        bad = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
        if bad:
            i, why = bad[0]
            more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
            raise BadRequest(f"row {i}: {_line(why)}{more}; send encoded image files (PNG, JPEG, ...)")
        return [
            {k: getattr(r, k) for k in ("label", "confidence", "probabilities", "abstain", "reason")}
            for r in results
        ]


def images_of(frame, max_images: int) -> list[bytes]:
    """The request's encoded images, checked before any decoding: a DataFrame with a column `image`
    of non-empty bytes, at least one row and at most `max_images`."""
    columns = list(getattr(frame, "columns", ()))
    if COLUMN not in columns:
        raise BadRequest(f"no column {COLUMN!r} (got {columns[:5]}); send the images as column {COLUMN!r}")
    if len(frame) == 0:
        raise BadRequest("the request holds no images")
    if len(frame) > max_images:
        raise BadRequest(
            f"{len(frame)} images in one request; this model takes at most {max_images}: split the batch"
        )
    blobs = []
    for i, value in enumerate(frame[COLUMN]):
        if not isinstance(value, bytes | bytearray):
            raise BadRequest(f"row {i}: {type(value).__name__}, not image bytes (base64 in JSON)")
        if not value:
            raise BadRequest(f"row {i}: empty")
        blobs.append(bytes(value))
    return blobs


def _line(text: str) -> str:
    return (text.splitlines() or [""])[0][:300]


def signature():
    """The served interface: a `binary` column `image` in (MLflow decodes base64 for it), an
    `abstain` param (false: the raw argmax), one record per image out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    inputs = Schema([ColSpec("binary", COLUMN)])
    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "confidence"),
            ColSpec(Map("double"), "probabilities"),
            ColSpec("boolean", "abstain", required=False),
            ColSpec("string", "reason", required=False),
        ]
    )
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("abstain", "boolean", True)]))
