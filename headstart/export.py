"""ONNX with a dynamic batch and the preprocessing contract in its metadata; fp32 and fp16 variants;
parity with torch on real images at several batch sizes. A model whose rule has the feature gate
exports a second output, `ood_score`, computed in the graph from the pooled features."""

from __future__ import annotations

import copy
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from headstart import HeadstartError, __version__
from headstart.atomic import write_bytes
from headstart.calibration import OOD_OUTPUT, FeatureGate
from headstart.ops.memory import reused_buffers
from headstart.preprocess import InputSpec, decode, normalise, to_uint8
from headstart.quantize import quantize_int8
from headstart.runtime import EXPORT_FILES, Predictor

LAYOUTS = {
    "float32": "NCHW float32 RGB, resized, centre-cropped, (x/255-mean)/std",
    "uint8": "NHWC uint8 RGB (0-255), resized and centre-cropped; the graph normalises",
}
PARITY_WORKERS = 4  # onnxruntime runs side by side in the parity check, at most (and at most one per core)
# a grey model (InputSpec.channels 1) takes one channel: colour images are made grey (Pillow's "L")
GREY_LAYOUTS = {k: v.replace(" RGB", " grey (1 channel)") for k, v in LAYOUTS.items()}


class Uint8Input(nn.Module):
    """A model that takes resized, cropped uint8 NHWC (spec.channels deep: RGB or grey) and normalises
    in the graph, with the same arithmetic as headstart.preprocess (x * (1/255/std) - mean/std)."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        c = spec.channels
        std, mean = torch.tensor(spec.std).view(1, c, 1, 1), torch.tensor(spec.mean).view(1, c, 1, 1)
        self.register_buffer("scale", (1 / 255) / std)
        self.register_buffer("shift", mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2).float() * self.scale - self.shift)


class OodScore(nn.Module):
    """calibration.FeatureGate.score in torch, its constants as buffers (initializers in the graph)."""

    def __init__(self, gate: FeatureGate):
        super().__init__()
        for name, v in (("means", gate.means), ("basis", gate.basis), ("weights", gate.weights)):
            self.register_buffer(name, torch.tensor(v, dtype=torch.float32))
        self.register_buffer("inv_sigma2", torch.tensor(1.0 / gate.sigma2, dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.to(self.means.dtype)
        r = (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12))[:, None, :] - self.means
        p = r @ self.basis
        return torch.amin((p * p) @ self.weights + (r * r).sum(-1) * self.inv_sigma2, 1)


class Scored(nn.Module):
    """A classifier split at its pooled features: (logits, the feature gate's score) from one pass."""

    def __init__(self, features: nn.Module, head: nn.Module, gate: FeatureGate):
        super().__init__()
        self.features, self.head, self.gate = features, head, OodScore(gate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f), self.gate(f)


def feature_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(pooled features, head) of a headstart model's module: a transfer Classifier's backbone and
    head, a from-scratch ResNet's layers up to the pooling and its final linear layer."""
    if hasattr(model, "features") and hasattr(model, "head"):
        return model.features, model.head
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model[:-1], model[-1]
    raise HeadstartError(f"{type(model).__name__}: no pooled features to gate on (not a headstart model)")


def scored(model: nn.Module, gate: FeatureGate | None) -> nn.Module:
    """The module to export: the model itself, or with the feature gate's score as a second output."""
    return model if gate is None else Scored(*feature_parts(model), gate).eval()


class Fp16(nn.Module):
    """fp16 weights and compute inside, fp32 in and out: a drop-in for the fp32 model on a GPU. The
    gate's score stays fp32: a sum of squares over ~1280 dims cancelling against 1/sigma2 loses
    too many digits in fp16 for a threshold decision, and it costs a few small matmuls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()
        if isinstance(self.model, Scored):
            self.model.gate.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(x.half())
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


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
    model, s, c = Fp16(model) if fp16 else model, spec.size, spec.channels
    if input_kind == "uint8":
        return Uint8Input(model, spec).eval(), torch.zeros(2, s, s, c, dtype=torch.uint8)
    return model.eval(), torch.zeros(2, c, s, s)


@reused_buffers()  # an onnx graph's initializers: copied, converted, serialised
def export_onnx(
    model: nn.Module | None,
    path: str | Path,
    spec: InputSpec,
    metadata: dict[str, str],
    opset: int,
    input_kind: str = "float32",
    fp16: bool = False,
    gate: FeatureGate | None = None,
    graft: Path | None = None,
    head: nn.Module | None = None,
) -> Path:
    """The deployable model: to_onnx plus the preprocessing contract in its metadata; with `gate`,
    a second output `ood_score` (its score on the pooled features, shape [N]). `graft`: a backbone
    graph checked by graft.graft_source: the model's head (`head`, else the model's own) is composed
    with it (headstart.graft), and `model` may be None."""
    if graft is not None:
        from headstart.graft import grafted

        head = head if head is not None else feature_parts(model)[1]
        proto = grafted(onnx.load(graft), head, spec, input_kind, fp16, gate)
    else:
        module, example = deployable(scored(model, gate), spec, input_kind, fp16)
        outputs = "logits" if gate is None else ["logits", OOD_OUTPUT]
        proto = to_onnx(module, spec.size, opset, outputs, example=example)
    meta = {
        "headstart.version": __version__,
        "headstart.input_spec": spec.to_json(),
        "headstart.input": input_kind,
        "headstart.input_layout": (LAYOUTS if spec.channels == 3 else GREY_LAYOUTS)[input_kind],
        "headstart.precision": "fp16" if fp16 else "fp32",
        **metadata,
    }
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return write_bytes(path, proto.SerializeToString())


class Normalised:
    """uint8 pixels as a float32 model takes them, normalised slice by slice when read: the floats
    of 256 images at 224 px would hold 154 MB beside the pixels' 38 MB for the whole export."""

    def __init__(self, pixels: np.ndarray, spec: InputSpec):
        self.pixels, self.spec = pixels, spec

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.stack([normalise(a, self.spec) for a in self.pixels[rows]])


@dataclass(frozen=True)
class Reference:
    """What every variant's parity check compares against: the test images decoded once (uint8)
    and torch's fp32 logits on them (and the gate's scores, for a Scored model)."""

    spec: InputSpec
    pixels: np.ndarray
    logits: np.ndarray
    ood: np.ndarray | None = None

    def inputs(self, kind: str) -> np.ndarray | Normalised:
        """The images as a model of input kind `kind` ("uint8" or "float32") takes them."""
        return self.pixels if kind == "uint8" else Normalised(self.pixels, self.spec)

    @property
    def floats(self) -> np.ndarray:
        return Normalised(self.pixels, self.spec)[:]


@torch.inference_mode()
def torch_reference(
    model: nn.Module | None,
    paths: list[Path],
    spec: InputSpec,
    features: np.ndarray | None = None,
    after: nn.Module | None = None,
) -> Reference:
    """torch's outputs on the images. `features`: torch's pooled features of the same images (the
    feature cache's, for a frozen backbone): then only what follows them runs here, `after` (default:
    the model's head, and a Scored model's gate), and `model` may be None (never built)."""
    if not paths:
        raise HeadstartError("parity check needs at least one image")
    with ThreadPoolExecutor(_workers()) as pool:  # Pillow decodes and resizes without the GIL
        pixels = np.stack(list(pool.map(lambda p: to_uint8(decode(p, keep_grey=True), spec), paths)))
    if features is not None:
        outs = [(after or _after_features(model))(torch.from_numpy(features))]
    else:
        floats = Normalised(pixels, spec)
        model = model.eval().to(memory_format=torch.channels_last)  # same math, ~2x faster on a CPU
        outs = [
            model(torch.from_numpy(floats[i : i + 32]).to(memory_format=torch.channels_last))
            for i in range(0, len(paths), 32)
        ]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    logits = np.concatenate([o[0].float().numpy() for o in outs])
    ood = np.concatenate([o[1].float().numpy() for o in outs]) if len(outs[0]) > 1 else None
    return Reference(spec, pixels, logits, ood)


def engine_check(path: Path) -> str:
    """What the cached backbone graph's export check found (headstart.features.check_engine)."""
    from headstart.features import CHECK_KEY

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    diff = meta.get(CHECK_KEY)
    return (
        "the graph's check against torch not recorded"
        if diff is None
        else (f"the graph matched torch within {float(diff):.1e} of the features' scale when exported")
    )


def _after_features(model: nn.Module) -> nn.Module:
    """The model's output from its pooled features: the head's logits (and a Scored model's score)."""
    if isinstance(model, Scored):
        return lambda f: (model.head(f), model.gate(f))
    return feature_parts(model)[1]


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(PARITY_WORKERS, cores or 1))


def parity(
    model: nn.Module,
    onnx_path: str | Path,
    paths: list[Path],
    batch_sizes: tuple[int, ...] = (1, 7, 32),
    labels: list[int] | None = None,
    reference: Reference | None = None,
    slack: float = 0.0,
) -> dict:
    """Torch (fp32, the reference) vs onnxruntime on real images, at each batch size: max abs logit
    difference, top-1 agreement and, where labels are given (>= 0: the test images), accuracy through
    each. A flip on an image whose torch top-2 margin is at most 2 * `slack` (what the variant's
    precision may move two logits) is a near-tie: reported, but not counted in the `decisive` figures
    the gate reads. `reference` (torch_reference on the same paths) saves decoding and the torch pass.
    How each batch size's outputs were obtained: batch_outputs (`checked` in its figures)."""
    if not paths:
        raise HeadstartError("parity check needs at least one image")
    # one onnxruntime thread per run, runs side by side: a third of the CPU time of one run on
    # every core at batch 1 (measured: 2.5 s vs 6.2 s for 256 images), the same outputs bit for bit
    # no memory arena: each run's buffers go back when it ends (fp16's arena kept 0.18 GB more)
    predictor = Predictor(onnx_path, ("CPUExecutionProvider",), warmup=False, threads=1, arena=False)
    if reference is None or reference.spec != predictor.spec or len(reference.logits) != len(paths):
        reference = torch_reference(model, paths, predictor.spec)
    feed = reference.inputs(predictor.input_kind)
    y = np.full(len(paths), -1) if labels is None else np.asarray(labels)
    per_size = {}
    for bs, ((logits, ours), checked) in batch_outputs(predictor, feed, batch_sizes).items():
        per_size[str(bs)] = agreement(reference.logits, logits, y, slack) | {"checked": checked}
        if reference.ood is not None and ours is not None:
            per_size[str(bs)] |= ood_agreement(reference.ood, ours, predictor.contract.rule)
    worst = {
        k: max(v[k] for v in per_size.values())
        for k in ("max_abs_logit_diff", "metric_diff", "decisive_metric_diff", "near_ties")
    }
    ood = {
        k: max(v[k] for v in per_size.values())
        for k in ("ood_max_abs_diff_over_tau", "ood_decision_flips")
        if k in per_size[str(batch_sizes[0])]
    }
    return {
        **ood,
        "n_images": len(paths),
        "n_labelled": int((y >= 0).sum()),
        "batch_sizes": per_size,
        "max_abs_logit_diff": worst["max_abs_logit_diff"],
        "top1_agreement": min(v["top1_agreement"] for v in per_size.values()),
        "decisive_top1_agreement": min(v["decisive_top1_agreement"] for v in per_size.values()),
        "near_ties": worst["near_ties"],
        "accuracy_torch": per_size[str(batch_sizes[0])]["accuracy_torch"],
        "max_metric_diff": worst["metric_diff"],
        "decisive_metric_diff": worst["decisive_metric_diff"],
        "slack": slack,
        "providers": predictor.providers,
        "input": predictor.input_kind,
        "classes": predictor.classes,
    }


Outputs = tuple[np.ndarray, np.ndarray | None]  # logits and the gate's score (None: no gate output)


def batch_outputs(predictor: Predictor, feed: np.ndarray, batch_sizes) -> dict[int, tuple[Outputs, str]]:
    """Each batch size's outputs on every image, and how they were obtained. The smallest size runs
    on every image. Every other size first runs a probe: its first batch (every row position) and
    its last, partial batch (every batch shape that size makes). onnxruntime's CPU kernels follow
    shapes, never values, and compute each row on its own: outputs bitwise equal to the full run's
    on the probe mean that size computes every image as the full run did, so those are its outputs.
    Any difference, and that size runs on every image too (a graph that mixes rows, or a kernel that
    changes with the batch).

    The smallest size's runs go side by side, one per worker, one onnxruntime thread each. A probe's
    batches run one after another, each on every worker's thread (probe_plan; the session is
    reopened, never held twice): one large batch's activations in memory at a time (80 images:
    ~0.1 GB less at export's peak than its two batches side by side), and its outputs must match
    batch `base`'s at another batch size and another thread count (the demo's batch-32 probe: 0.71 ->
    0.39 s fp32, 0.96 -> 0.63 s fp16 on 2 threads, bit for bit the same)."""
    n, base = len(feed), min(batch_sizes)
    with reused_buffers():  # one run per image at batch 1: the same buffers every time
        full = _run(predictor, feed, base, range(0, n, base))
    out = {base: (full, "every image")}
    for bs, (starts, threads) in probe_plan(n, batch_sizes).items():
        rows = np.concatenate([np.arange(s, min(s + bs, n)) for s in starts])
        predictor.use_threads(threads)
        probe = _run(predictor, feed, bs, starts, side_by_side=1)
        if all(a is None or np.array_equal(a, b[rows]) for a, b in zip(probe, full, strict=True)):
            out[bs] = (full, f"bitwise equal to batch {base} on {len(rows)} probe images")
        else:
            predictor.use_threads(1)
            out[bs] = (_run(predictor, feed, bs, range(0, n, bs)), f"every image (batch {base} differs)")
    return {bs: out[bs] for bs in batch_sizes}


def probe_plan(n: int, batch_sizes) -> dict[int, tuple[list[int], int]]:
    """Each batch size above the smallest: where its probe's batches start (the first batch and the
    last, partial one) and how many onnxruntime threads each of them runs on, one batch at a time:
    every worker's (a batch of 32 holds ~0.15 GB of Lite0's activations; two side by side, twice that)."""
    plan = {}
    for bs in sorted(set(batch_sizes) - {min(batch_sizes)}):
        plan[bs] = (sorted({0, *([n - n % bs] if n % bs else [])}), _workers())
    return plan


def _run(predictor: Predictor, feed: np.ndarray, bs: int, starts, side_by_side: int = 0) -> Outputs:
    """The batches of `bs` images starting at `starts`, run `side_by_side` at a time (default: one
    per worker); outputs in their order."""
    with ThreadPoolExecutor(side_by_side or _workers()) as pool:
        runs = list(pool.map(lambda i: predictor.outputs(feed[i : i + bs]), starts))
    ood = None if runs[0][1] is None else np.concatenate([r[1] for r in runs])
    return np.concatenate([r[0] for r in runs]), ood


def agreement(ours: np.ndarray, theirs: np.ndarray, y: np.ndarray, slack: float) -> dict:
    """Two runtimes' logits on the same images compared; near-ties (torch's top-2 margin <= 2*slack)
    may flip without counting against the gate. Accuracies over the labelled images (y >= 0)."""
    a, b = ours.argmax(1), theirs.argmax(1)
    top2 = np.sort(ours, 1)[:, -2:] if ours.shape[1] > 1 else np.concatenate([ours, ours - np.inf], 1)
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * slack
    settled = np.where(decisive, b, a)  # the variant's answer, near-ties read as torch's
    labelled = y >= 0

    def accuracy(pred: np.ndarray) -> float:
        return float((pred[labelled] == y[labelled]).mean()) if labelled.any() else float("nan")

    return {
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "top1_agreement": float((a == b).mean()),
        "decisive_top1_agreement": float((a == b)[decisive].mean()) if decisive.any() else 1.0,
        "near_ties": int((~decisive).sum()),
        "flipped_near_ties": int(((a != b) & ~decisive).sum()),
        "accuracy_torch": accuracy(a),
        "accuracy_onnx": accuracy(b),
        "metric_diff": abs(accuracy(b) - accuracy(a)) if labelled.any() else 0.0,
        "decisive_metric_diff": abs(accuracy(settled) - accuracy(a)) if labelled.any() else 0.0,
    }


def ood_agreement(ours: np.ndarray, theirs: np.ndarray, rule) -> dict:
    """The gate's score in torch and in the graph: the largest difference relative to the threshold,
    and the share of images whose in/out decision differs."""
    tau = rule.ood["threshold"] if rule is not None and rule.ood else float("nan")
    return {
        "ood_max_abs_diff_over_tau": float(np.abs(ours - theirs).max() / abs(tau)),
        "ood_decision_flips": float(((ours > tau) != (theirs > tau)).mean()),
    }


def judge(figures: dict, tol) -> list[str]:
    """Why a variant fails its parity tolerance (`tol`: config.Tolerance); empty when it passes."""
    checks = (
        ("max abs logit diff", figures["max_abs_logit_diff"], "<=", tol.max_abs_diff),
        (
            "top-1 agreement beyond near-ties",
            figures["decisive_top1_agreement"],
            ">=",
            tol.min_top1_agreement,
        ),
        ("test accuracy diff beyond near-ties", figures["decisive_metric_diff"], "<=", tol.max_metric_diff),
    )
    return [
        f"{name} {value:.4g} (limit {limit})"
        for name, value, op, limit in checks
        if not (value <= limit if op == "<=" else value >= limit)
    ]


def parity_images(frame, cap: int):
    """The images parity runs on: every test image (the accuracy difference is a test-split figure)
    and, up to `cap` in all, images of the other splits in a fixed order: comparing two runtimes
    needs no labels, and more images catch more disagreements than a small test split."""
    test = frame[frame["split"] == "test"]
    rest = frame[frame["split"] != "test"].sort_values("sha256")
    return pd.concat([test, rest.head(max(0, cap - len(test)))]).reset_index(drop=True)


def to_markdown(figures: dict[str, dict]) -> str:
    """The parity table per variant and batch size, and each variant's verdict."""
    lines = [
        "# Export parity (onnxruntime vs the reference, real images)",
        "",
        "| model | batch | max abs logit diff | top-1 agreement | near-ties flipped | accuracy onnx | "
        "accuracy reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures.values():
        for bs, v in f["batch_sizes"].items():
            lines.append(
                f"| {f['file']} | {bs} | {v['max_abs_logit_diff']:.2e} | {v['top1_agreement']:.4f} | "
                f"{v['flipped_near_ties']} of {v['near_ties']} | {v['accuracy_onnx']:.4f} | "
                f"{v['accuracy_torch']:.4f} |"
            )
    verdicts = [
        f"- {n}: {'passed' if f['passed'] else 'FAILED: ' + '; '.join(f['failures'])}"
        + ("" if f["passed"] or f["required"] else " (optional: not registered)")
        for n, f in figures.items()
    ]
    n = next(iter(figures.values()))
    gate = [
        f"- {f['file']}: ood_score max abs diff {f['ood_max_abs_diff_over_tau']:.2e} of the threshold; "
        f"in/out decision flipped on {100 * f['ood_decision_flips']:.2f}% of images"
        for f in figures.values()
        if "ood_decision_flips" in f
    ]
    verdicts += gate
    verdicts += [
        f"- {f['file']}: calibrated on {f['calibration_images']} training images"
        + (f" ({len(f['calibration_skipped'])} skipped: not decodable)" if f["calibration_skipped"] else "")
        for f in figures.values()
        if "calibration_images" in f
    ]
    verdicts += [f"- {f['file']}: {f['build']}" for f in figures.values() if "build" in f]
    verdicts += [
        f"- {f['file']}: compared with {f['reference']}" for f in figures.values() if "reference" in f
    ]
    verdicts += [
        f"- {f['file']}, batch {bs}: {v['checked']}"
        for f in figures.values()
        for bs, v in f["batch_sizes"].items()
        if v.get("checked", "every image") != "every image"
    ]
    return (
        "\n".join(
            [
                *lines,
                "",
                f"{n['n_images']} images ({n['n_labelled']} labelled test images for the accuracy).",
                "",
                *verdicts,
            ]
        )
        + "\n"
    )


def export_variants(
    model,
    out: Path,
    meta: dict[str, str],
    paths: list[Path],
    labels: list[int],
    p,
    gate=None,
    calibration: list[Path] = (),
    cache_dir=None,
    shas: list[str] | None = None,
) -> dict:
    """Each variant (fp32, fp16 when `p.fp16`, int8 when `p.int8`; `p`: config.ExportParams) exported
    into `out` and held to its tolerance on the parity images, torch run once for all (with the images'
    `shas` and a feature cache, torch's pass over a frozen backbone is read from it); an optional
    variant that fails is deleted, so only files that passed remain. int8 is quantized from the fp32
    file, calibrated on `calibration` (training images). With `gate` (calibration.FeatureGate) every
    variant has the `ood_score` output and the figures its agreement. A head on a frozen backbone is
    grafted onto the backbone graph cached in `cache_dir` (headstart.graft), else exported whole;
    `build` in each variant's figures says which and why. Returns each variant's figures and verdict."""
    from headstart.graft import graft_source

    spec = model.spec  # any model of headstart.models: .module takes the spec's normalised input
    graft, build = graft_source(model, cache_dir, p.opset, gate)
    cached = (
        shas is not None and cache_dir is not None and getattr(model, "kind", None) in ("head", "finetuned")
    )
    if graft is not None and cached:
        # the file is the cached backbone graph + the head: the reference is that graph's features
        # of the parity images (the feature cache's, what the head trained on when runtime is
        # onnxruntime) + the torch head. The graph itself was checked against torch when it was
        # exported (features.check_engine), so the torch backbone is never built here (~6 s less)
        features = model.features(paths, shas, "onnxruntime", cache_dir, 32)
        module, source = None, None
        after = model.head if gate is None else Scored(nn.Identity(), model.head, gate).eval()
        reference = torch_reference(None, paths, spec, features, after)
        against = f"the cached backbone graph's features + the torch head ({engine_check(graft)})"
    else:
        # torch's own features of the parity images (runtime torch, fp32), computed once per content
        features = model.features(paths, shas, "torch", cache_dir, 32) if cached else None
        module, source = scored(model.module, gate), model.module
        reference = torch_reference(module, paths, spec, features)
        against = "torch, the whole model"
    figures = {}
    for name in ["fp32"] + ["fp16"] * p.fp16 + ["int8"] * p.int8:
        file, tol, made = out / EXPORT_FILES[name], getattr(p.tolerances, name), {}
        if name == "int8":  # from the fp32 file written above, however it was made
            made = quantize_int8(out / EXPORT_FILES["fp32"], file, calibration)
        else:
            fp16 = name == "fp16"
            head = model.head if graft is not None else None  # a graft is only ever of a TrainedModel
            export_onnx(source, file, spec, meta, p.opset, p.input, fp16, gate, graft, head)
        f = parity(module, file, paths, tuple(p.parity_batch_sizes), labels, reference, tol.max_abs_diff)
        f |= made
        failures = judge(f, tol)
        required = name == "fp32" or name in p.require
        f.update(
            file=EXPORT_FILES[name],
            tolerances=tol.model_dump(),
            passed=not failures,
            failures=failures,
            required=required,
            build=f"quantized from {EXPORT_FILES['fp32']}" if name == "int8" else build,
            reference=against,
        )
        figures[name] = f
        if failures and not required:
            file.unlink()  # an optional variant that failed is never registered
    (out / "variants").mkdir(exist_ok=True)  # declared to DVC even when no optional variant passed
    return figures
