"""Inference with onnxruntime, numpy and Pillow only (no torch, no mlflow): an exported headstart model
reads its own preprocessing contract from its metadata, so serving preprocesses exactly as training.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart import HeadstartError
from headstart.preprocess import InputSpec, decode, normalise, to_uint8

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# the files the export stage writes, by variant (optional ones in variants/, present when they
# passed their parity gate); a registered version carries those that passed
EXPORT_FILES = {"fp32": "model.onnx", "fp16": "variants/model_fp16.onnx"}
PROVIDER_NAMES = {"tensorrt": DEFAULT_PROVIDERS[0], "cuda": DEFAULT_PROVIDERS[1], "cpu": DEFAULT_PROVIDERS[2]}


@dataclass
class Prediction:
    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None


def provider_list(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`tensorrt,cuda,cpu` (or full onnxruntime names) -> onnxruntime provider names, in order."""
    if not names:
        return DEFAULT_PROVIDERS
    items = names.split(",") if isinstance(names, str) else list(names)
    out = []
    for item in (i.strip() for i in items if i.strip()):
        if item.lower() in PROVIDER_NAMES:
            out.append(PROVIDER_NAMES[item.lower()])
        elif item.endswith("ExecutionProvider"):
            out.append(item)
        else:
            raise HeadstartError(f"unknown provider {item!r}; choose from tensorrt, cuda, cpu")
    return tuple(out)


class Predictor:
    """An exported headstart model: images in, class probabilities out. Providers are tried in the
    given order (TensorRT -> CUDA -> CPU by default); `providers` says which ones the session really
    uses. On a GPU the inputs go through IO binding and one warm-up run builds the engines."""

    def __init__(
        self,
        model_path: str | Path,
        providers: tuple[str, ...] | str | None = DEFAULT_PROVIDERS,
        warmup: bool = True,
    ):
        import onnxruntime as ort

        self.path = Path(model_path)
        if not self.path.is_file():
            raise HeadstartError(f"model file {self.path} does not exist")
        available = ort.get_available_providers()
        wanted = [p for p in provider_list(providers) if p in available and _loadable(p)]
        wanted = wanted or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # a missing CUDA library on a CPU machine is not worth a warning
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=wanted)
        except Exception as exc:
            if wanted == ["CPUExecutionProvider"]:
                raise HeadstartError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
            # a listed GPU provider that cannot start: fall back to the CPU; `providers` tells
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: list[str] = json.loads(meta["headstart.classes"])
            self.spec = InputSpec.from_json(meta["headstart.input_spec"])
        except KeyError as exc:
            raise HeadstartError(f"{self.path}: not a headstart model (no {exc} metadata)") from None
        self.input_kind = meta.get("headstart.input", "float32")
        self.metadata = dict(meta)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        if warmup and self.on_gpu:
            self.logits(self._blank(1))

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, not the ones compiled in."""
        return self.session.get_providers()

    def _blank(self, n: int) -> np.ndarray:
        s = self.spec.size
        if self.input_kind == "uint8":
            return np.zeros((n, s, s, 3), np.uint8)
        return np.zeros((n, 3, s, s), np.float32)

    def load(self, path: str | Path) -> np.ndarray:
        """One image file as this model's input (uint8 HWC or float32 CHW, per its metadata)."""
        pixels = to_uint8(decode(path, keep_grey=True), self.spec)
        return pixels if self.input_kind == "uint8" else normalise(pixels, self.spec)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.uint8 if self.input_kind == "uint8" else np.float32)
        if not self.on_gpu:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()  # the copy to the device happens once, in ORT
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict(self, paths: list[str | Path], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, one row per image, in `self.classes` order; raises on a bad file."""
        out = []
        for i in range(0, len(paths), batch_size):
            batch = np.stack([self.load(p) for p in paths[i : i + batch_size]])
            out.append(softmax(self.logits(batch)))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_files(
        self, paths: list[str | Path], batch_size: int = 32, workers: int = 4
    ) -> list[Prediction]:
        """Every file gets a Prediction: a label and probabilities, or the reason it could not be
        read; decoding runs in threads, a batch ahead of the model."""
        results: list[Prediction] = [Prediction(str(p)) for p in paths]

        def load(i: int):
            try:
                return i, self.load(paths[i])
            except Exception as exc:  # unreadable, truncated, not an image, too large
                results[i].error = f"{type(exc).__name__}: {exc}"
                return i, None

        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(paths), batch_size):
                loaded = [
                    r
                    for r in pool.map(load, range(start, min(start + batch_size, len(paths))))
                    if r[1] is not None
                ]
                if not loaded:
                    continue
                probs = softmax(self.logits(np.stack([x for _, x in loaded])))
                for (i, _), row in zip(loaded, probs, strict=True):
                    k = int(row.argmax())
                    results[i].label, results[i].confidence = self.classes[k], float(row[k])
                    results[i].probabilities = {c: float(v) for c, v in zip(self.classes, row, strict=True)}
        return results


def _loadable(provider: str) -> bool:
    """onnxruntime-gpu lists its GPU providers whether or not the machine can run them, and prints
    an error for each that fails to load: ask the system libraries first (a driver, TensorRT)."""
    import ctypes

    needs = {
        "CUDAExecutionProvider": ["libcuda.so.1"],
        "TensorrtExecutionProvider": ["libcuda.so.1", "libnvinfer.so.10"],
    }
    for lib in needs.get(provider, []):
        try:
            ctypes.CDLL(lib)
        except OSError:
            return False
    return True


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
