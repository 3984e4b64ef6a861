"""Inference with onnxruntime only (no torch, no mlflow): reads the model's own preprocessing contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headstart import HeadstartError
from headstart.preprocess import InputSpec, load_batch

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Predictor:
    """An exported headstart model: images in, class probabilities out."""

    def __init__(self, model_path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS):
        import onnxruntime as ort

        self.path = Path(model_path)
        if not self.path.is_file():
            raise HeadstartError(f"model file {self.path} does not exist")
        wanted = [p for p in providers if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # a missing CUDA library on a CPU machine is not worth a warning
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=wanted)
        except Exception:  # a listed GPU provider that cannot start: fall back to the CPU, say so below
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: list[str] = json.loads(meta["headstart.classes"])
            self.spec = InputSpec.from_json(meta["headstart.input_spec"])
        except KeyError as exc:
            raise HeadstartError(f"{self.path}: not a headstart model (no {exc} metadata)") from None
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, not the ones compiled in."""
        return self.session.get_providers()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.astype(np.float32)})[0]

    def predict(self, paths: list[str | Path], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, one row per image, in `self.classes` order."""
        out = []
        for i in range(0, len(paths), batch_size):
            out.append(softmax(self.logits(load_batch(paths[i : i + batch_size], self.spec))))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
