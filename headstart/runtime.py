"""Inference with onnxruntime, numpy and Pillow only (no torch, no mlflow): an exported headstart model
reads its own preprocessing contract from its metadata, so serving preprocesses exactly as training.
"""

from __future__ import annotations

import io
import json
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from headstart import HeadstartError
from headstart.calibration import METADATA_KEY, OOD_OUTPUT, AbstentionRule, apply
from headstart.preprocess import _INTERPOLATION, ImageRefused, InputSpec, decode, normalise, to_uint8

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# the files the export stage writes, by variant (optional ones in variants/, present when they
# passed their parity gate); a registered version carries those that passed
EXPORT_FILES = {
    "fp32": "model.onnx",
    "fp16": "variants/model_fp16.onnx",
    "int8": "variants/model_int8.onnx",
}
PROVIDER_NAMES = {"tensorrt": DEFAULT_PROVIDERS[0], "cuda": DEFAULT_PROVIDERS[1], "cpu": DEFAULT_PROVIDERS[2]}


# graph input layouts by headstart.input: which axes hold the channels and the image size
_LAYOUT = {"float32": (1, (2, 3)), "uint8": (3, (1, 2))}
_MAX_SIZE = 8192  # an input side beyond any backbone: a spec asking for more is damaged, not big


@dataclass
class Prediction:
    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    abstain: bool | None = None  # True: the model declines to answer (label is still its argmax)
    reason: str | None = None  # why it abstained (see Predictor.decide)
    error: str | None = None

    def tsv(self) -> str:
        """One tab-separated line: path, label, confidence, and `abstain:<reason>` when the model
        declines (or path, `error`, reason), each field escaped, so a tab or newline in a file or
        class name cannot forge a field or a line."""
        if self.error is not None:
            return "\t".join(map(tsv_field, (self.path, "error", self.error)))
        fields = [tsv_field(self.path), tsv_field(self.label or ""), f"{self.confidence:.4f}"]
        return "\t".join(fields + ([tsv_field(f"abstain:{self.reason}")] if self.abstain else []))


def tsv_field(text: str) -> str:
    r"""Backslash escapes for what would break a line-and-tab format: \\, \t, \n, \r, other control
    and line-separator characters as \xNN/\uNNNN, and the bytes of an undecodable file name (Python
    keeps them as lone surrogates) as \xNN."""
    return "".join(_escape(c) for c in text)


def _escape(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    if 0xDC80 <= ord(c) <= 0xDCFF:  # os.fsdecode's surrogateescape: the original byte
        return f"\\x{ord(c) - 0xDC00:02x}"
    if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return c


_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


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
        threads: int = 0,
        arena: bool = True,
    ):
        import onnxruntime as ort

        self.path = Path(model_path)
        if not self.path.is_file():
            raise HeadstartError(f"model file {self.path} does not exist")
        available = ort.get_available_providers()
        wanted = [p for p in provider_list(providers) if p in available and _loadable(p)]
        wanted = wanted or ["CPUExecutionProvider"]
        self.threads, self._arena = threads, arena
        try:
            self.session = self._open(wanted)
        except Exception as exc:
            if wanted == ["CPUExecutionProvider"]:
                raise HeadstartError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
            # a listed GPU provider that cannot start: fall back to the CPU; `providers` tells
            self.session = self._open(["CPUExecutionProvider"])
        self.contract = Contract.from_metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        self.contract.check_graph(self.session, self.path)
        self.classes, self.spec, self.input_kind = (
            self.contract.classes,
            self.contract.spec,
            self.contract.input_kind,
        )
        self.metadata = self.contract.metadata
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        # the feature gate's score, when the graph computes it (check_graph refuses a rule that
        # needs it on a graph without it)
        names = [o.name for o in self.session.get_outputs()]
        self.ood_name = OOD_OUTPUT if OOD_OUTPUT in names[1:] else None
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        if warmup and self.on_gpu:
            self.logits(self._blank(1))

    def _open(self, providers: list[str]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # a missing CUDA library on a CPU machine is not worth a warning
        opts.intra_op_num_threads = self.threads  # 0: onnxruntime's default (one per core)
        opts.enable_cpu_mem_arena = self._arena  # off: memory goes back after each run (a one-off check)
        return ort.InferenceSession(str(self.path), opts, providers=providers)

    def use_threads(self, threads: int) -> None:
        """Reopen the session with `threads` onnxruntime threads per run (same file, providers and
        arena). The old session is let go first: never two copies of the weights at once."""
        from headstart.ops.memory import trim_heap

        if threads != self.threads:
            providers, self.session = self.providers, None
            trim_heap()  # what the old session freed goes back before the new one allocates
            self.threads = threads
            self.session = self._open(providers)

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, not the ones compiled in."""
        return self.session.get_providers()

    def _blank(self, n: int) -> np.ndarray:
        s = self.spec.size
        if self.input_kind == "uint8":
            return np.zeros((n, s, s, self.spec.channels), np.uint8)
        return np.zeros((n, self.spec.channels, s, s), np.float32)

    def load(self, path: str | Path) -> np.ndarray:
        """One image file as this model's input (uint8 HWC or float32 CHW, per its metadata)."""
        return self.contract.load(path)

    def load_bytes(self, data: bytes) -> np.ndarray:
        """One encoded image (PNG, JPEG, ... bytes) as this model's input."""
        return self.contract.load(io.BytesIO(data))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, [self.output_name])[0]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, when the graph has it, the feature gate's `ood_score` (shape [N]), one pass."""
        if self.ood_name is None:
            return self.logits(batch), None
        logits, score = self._run(batch, [self.output_name, self.ood_name])
        return logits, score

    def _run(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, np.uint8 if self.input_kind == "uint8" else np.float32)
        if not self.on_gpu:
            return self.session.run(names, {self.input_name: batch})
        binding = self.session.io_binding()  # the copy to the device happens once, in ORT
        binding.bind_cpu_input(self.input_name, batch)
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def predict(self, paths: list[str | Path], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, one row per image, in `self.classes` order; raises on a bad file."""
        out = []
        for i in range(0, len(paths), batch_size):
            batch = np.stack([self.load(p) for p in paths[i : i + batch_size]])
            out.append(softmax(self.logits(batch)))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_files(
        self, paths: list[str | Path], batch_size: int = 32, workers: int = 4, abstain: bool = True
    ) -> list[Prediction]:
        """Every file gets a Prediction: a label and probabilities (and, with `abstain`, whether the
        model declines to answer and why), or the reason it could not be read; decoding runs in
        threads, a batch ahead of the model."""
        return self._predict_all([str(p) for p in paths], paths, self.load, batch_size, workers, abstain)

    def predict_bytes(
        self, blobs: list[bytes], batch_size: int = 32, workers: int = 4, abstain: bool = True
    ) -> list[Prediction]:
        """predict_files for encoded images in memory (a request body); `path` is the item's index."""
        return self._predict_all(
            [f"#{i}" for i in range(len(blobs))], blobs, self.load_bytes, batch_size, workers, abstain
        )

    def _predict_all(self, names, items, load_one, batch_size: int, workers: int, abstain: bool):
        results: list[Prediction] = [Prediction(n) for n in names]

        def load(i: int):
            try:
                return i, load_one(items[i])
            except ImageRefused as exc:  # refused before decoding: the reason is the whole story
                results[i].error = str(exc)
                return i, None
            except Exception as exc:  # unreadable, truncated, not an image
                results[i].error = f"{type(exc).__name__}: {exc}"
                return i, None

        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(items), batch_size):
                loaded = [
                    r
                    for r in pool.map(load, range(start, min(start + batch_size, len(items))))
                    if r[1] is not None
                ]
                if not loaded:
                    continue
                logits, score = self.outputs(np.stack([x for _, x in loaded]))
                decisions = self.decide(logits, abstain, score)
                for (i, _), d in zip(loaded, decisions, strict=True):
                    for k, v in d.items():
                        setattr(results[i], k, v)
        return results

    def decide(
        self, logits: np.ndarray, abstain: bool = True, ood_score: np.ndarray | None = None
    ) -> list[dict]:
        """The contract's answer for each row of logits and its gate score (Contract.decide)."""
        return self.contract.decide(logits, abstain, ood_score)


@dataclass
class Contract:
    """What an exported model's metadata promises: its classes (in output order), its input (spec and
    layout) and how an answer is made from its logits. Read from the ONNX metadata by Predictor, and
    usable without a session (a Triton client applies the same contract to the logits it gets)."""

    classes: list[str]
    spec: InputSpec
    input_kind: str
    metadata: dict[str, str]
    rule: AbstentionRule | None = None  # headstart.abstention: absent in models exported before it

    @classmethod
    def from_metadata(cls, source: str | Path, meta: dict[str, str]) -> Contract:
        """The contract in `meta` (an ONNX model's custom metadata), checked; `source` names the
        model in errors."""
        path = Path(source)
        if "headstart.classes" not in meta or "headstart.input_spec" not in meta:
            missing = "headstart.classes" if "headstart.classes" not in meta else "headstart.input_spec"
            raise HeadstartError(f"{path}: not a headstart model (no '{missing}' metadata)")
        classes, spec = _classes(path, meta["headstart.classes"]), _spec(path, meta["headstart.input_spec"])
        kind = meta.get("headstart.input", "float32")
        if kind not in _LAYOUT:
            raise HeadstartError(
                f"{path}: metadata headstart.input is {kind!r}, not one of {sorted(_LAYOUT)}"
            )
        return cls(classes, spec, kind, dict(meta), _rule(path, meta.get(METADATA_KEY), len(classes)))

    def check_graph(self, session, source: str | Path = "") -> None:
        """Metadata that disagrees with the graph would label images wrongly or fail on every batch."""
        path = Path(source or "model")
        out = session.get_outputs()[0]
        width = out.shape[-1] if out.shape else None
        if isinstance(width, int) and width != len(self.classes):
            raise HeadstartError(
                f"{path}: metadata headstart.classes names {len(self.classes)} classes but the graph's "
                f"output {out.name!r} has {width}; the file was altered: export the model again"
            )
        _check_input(path, session.get_inputs()[0], self.spec, self.input_kind)
        ood = self.rule.ood if self.rule is not None else None
        if ood and ood["output"] not in [o.name for o in session.get_outputs()[1:]]:
            raise HeadstartError(
                f"{path}: metadata {METADATA_KEY} gates on the graph output {ood['output']!r}, which the "
                "graph does not have; the file was altered: export the model again"
            )

    def load(self, source: str | Path | BinaryIO) -> np.ndarray:
        """One image (a file, or an open binary stream) as the model's input: uint8 HWC or float32
        CHW, per the metadata."""
        pixels = to_uint8(decode(source, keep_grey=True), self.spec)
        return pixels if self.input_kind == "uint8" else normalise(pixels, self.spec)

    def decide(
        self, logits: np.ndarray, abstain: bool = True, ood_score: np.ndarray | None = None
    ) -> list[dict]:
        """Per row of logits: label (the argmax), confidence, probabilities and, with `abstain`,
        whether the model declines to answer and why. The one place the answer is made: the CLI,
        the MLflow pyfunc and the Triton client example all go through it. With the metadata's
        abstention rule the probabilities are its temperature-calibrated ones and `ood_score` (the
        graph's output of that name; required when the rule has the feature gate) decides
        out_of_distribution; `abstain=False` is the raw softmax and argmax, abstain None; no rule:
        raw softmax, abstain False."""
        applied = apply(self.rule, logits, ood_score) if abstain and self.rule is not None else None
        probs = softmax(logits) if applied is None else applied.probabilities
        out = []
        for i, row in enumerate(probs):
            k = int(row.argmax())
            out.append(
                {
                    "label": self.classes[k],
                    "confidence": float(row[k]),
                    "probabilities": {c: float(v) for c, v in zip(self.classes, row, strict=True)},
                    "abstain": None if not abstain else bool(applied.abstain[i]) if applied else False,
                    "reason": applied.reasons[i] if applied else None,
                }
            )
        return out


def _rule(path: Path, text: str | None, n_classes: int) -> AbstentionRule | None:
    if text is None:
        return None
    rule = AbstentionRule.from_json(text, path)
    if rule.n_classes != n_classes:
        raise HeadstartError(
            f"{path}: metadata {METADATA_KEY} is for {rule.n_classes} classes but headstart.classes "
            f"names {n_classes}; run calibrate and export again"
        )
    return rule


def _check_input(path: Path, inp, spec: InputSpec, kind: str) -> None:
    channels, sides = _LAYOUT[kind]
    want = {channels: spec.channels, sides[0]: spec.size, sides[1]: spec.size}
    shape = list(inp.shape)
    bad = len(shape) != 4 or any(isinstance(shape[a], int) and shape[a] != n for a, n in want.items())
    if bad or (inp.type == "tensor(uint8)") != (kind == "uint8"):
        c = spec.channels
        layout = f"N,{c},S,S float" if kind == "float32" else f"N,S,S,{c} uint8"
        raise HeadstartError(
            f"{path}: metadata headstart.input_spec/headstart.input say {layout} with S={spec.size} but the "
            f"graph's input {inp.name!r} is {inp.type} {shape}; the file was altered: export the model again"
        )


def _classes(path: Path, text: str) -> list[str]:
    try:
        classes = json.loads(text)
    except ValueError:
        classes = None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise HeadstartError(f"{path}: metadata headstart.classes is not a JSON list of class names")
    return classes


def _spec(path: Path, text: str) -> InputSpec:
    try:
        spec = InputSpec.from_json(text)
        ok = isinstance(spec.size, int) and 1 <= spec.size <= _MAX_SIZE and 0 < spec.crop_pct <= 1
        ok = ok and spec.interpolation in _INTERPOLATION and spec.channels in (1, 3)
        ok = ok and len(spec.mean) == len(spec.std) == spec.channels
        ok = ok and all(isinstance(v, int | float) and v != 0 for v in spec.std)
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise HeadstartError(
            f"{path}: metadata headstart.input_spec is not a valid input spec (JSON with size 1-{_MAX_SIZE}, "
            "mean, std, interpolation, crop_pct, one mean/std per channel); export the model again"
        )
    return spec


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
