"""How far new images are from the backbone's pretraining data, from what the backbone itself carries.

No pretraining images are needed: every BatchNorm layer holds the running mean and variance of its
inputs over the pretraining set. Passing the new images through the frozen backbone and comparing each
layer's batch statistics with those running statistics (a symmetric KL between per-channel Gaussians)
gives a per-layer profile: early layers differ when low-level image statistics differ, late layers when
the content does. The input normalisation and the original classifier's confidence are further signals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

EPS = 1e-5


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d with running statistics (timm's BatchNormAct2d included), in module order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]


class Probe:
    """The domain check's instrumented backbone (ProbeModule), built on first use of `.module`:
    building it builds the backbone (timm, the weights) and runs a tracing pass. `.layers`, all that
    `analyse` needs of it, is the module's, or is given without it: a warm onnxruntime run reads them
    from the cached probe graph (headstart.features.make_engine), so it never builds the backbone."""

    def __init__(self, backbone):
        self.backbone, self._module, self._layers = backbone, None, None

    @property
    def module(self) -> ProbeModule:
        if self._module is None:
            self._module = ProbeModule(self.backbone)
        return self._module

    @property
    def built(self) -> bool:
        return self._module is not None

    @property
    def layers(self) -> list[dict]:
        return self.module.layers if self._layers is None else self._layers

    @layers.setter
    def layers(self, layers: list[dict]) -> None:
        self._layers = layers


def encode_layers(layers: list[dict]) -> str:
    """The probe's layers as JSON, for the cached probe graph's metadata; Python writes each float64
    in its shortest exact form, so decode_layers gives them back bit for bit."""
    return json.dumps(
        [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in layers]
    )


def decode_layers(text: str) -> list[dict]:
    """encode_layers' layers back (ValueError or KeyError when the text holds none)."""
    names = ("running_mean", "running_var", "weight")
    return [
        {"layer": str(r["layer"]), **{k: np.asarray(r[k], np.float64) for k in names}, "eps": float(r["eps"])}
        for r in json.loads(text)
    ]


class ProbeModule(nn.Module):
    """The frozen backbone instrumented for the domain check. One forward pass returns
    (features, logits, mean_0, meansq_0, mean_1, meansq_1, ...): the pooled features, exactly what the
    feature extractor computes (so the pass also fills the feature cache), the original classifier's
    logits, and per image the per-channel mean and mean square of each BatchNorm layer's output
    before its activation, less the layer's bias (the output at the running mean): centred on the
    pretrained statistics, mean square minus squared mean keeps its digits in float32 (uncentred,
    the cancellation moved scores by up to 0.003 between two summation orders).

    Why the output and not the input the running statistics describe: an ONNX export folds every
    BatchNorm into the convolution before it, so its input no longer exists there, while its output
    does. The layer's affine map is known (running mean and variance, weight, bias), and the KL
    divergence is invariant under it, so `analyse` maps the output statistics back exactly."""

    def __init__(self, backbone):
        super().__init__()
        self.extractor, self.classifier = backbone.feature_extractor(), backbone.classifier().eval()
        self._seen: list[str] = []
        for name, layer in bn_layers(self.extractor):
            act = getattr(layer, "act", None)  # timm's BatchNormAct2d: norm -> drop -> act
            bias = layer.bias
            if isinstance(act, nn.Module):
                act.register_forward_pre_hook(lambda _m, args, n=name, b=bias: self._record(n, args[0], b))
            else:
                layer.register_forward_hook(lambda _m, _a, out, n=name, b=bias: self._record(n, out, b))
        with torch.inference_mode():  # the layers in the order they run, which the outputs follow
            self.forward(torch.zeros(1, 3, backbone.spec.size, backbone.spec.size))
        modules = dict(self.extractor.named_modules())
        self.layers = [_reference(n, modules[n]) for n in self.order]

    def _record(self, name: str, y: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._seen.append(name)
        d = y if bias is None else y - bias.view(1, -1, 1, 1)
        self._stats += [d.mean((2, 3)), (d * d).mean((2, 3))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._seen, self._stats = [], []
        features = self.extractor(x)
        out = (features, self.classifier(features), *self._stats)
        self.order, self._stats = self._seen, []
        return out


def _reference(name: str, layer: nn.BatchNorm2d) -> dict:
    """What a BN layer carries: the running statistics of its input and its scale (the probe has
    already taken its bias off)."""
    c = layer.running_mean.numel()

    def arr(t):
        return np.ones(c) if t is None else t.detach().double().cpu().numpy()

    return {
        "layer": name,
        "running_mean": arr(layer.running_mean),
        "running_var": arr(layer.running_var),
        "weight": arr(layer.weight),
        "eps": float(layer.eps),
    }


def run_probe(probe: Probe, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """The probe in torch over preprocessed batches: (batch, outputs) for `analyse`."""
    from headstart.features import TorchEngine

    engine = TorchEngine(probe.module)
    for x in batches:
        yield x, engine(x)


def analyse(batches: Iterable[tuple[np.ndarray, list[np.ndarray]]], layers: list[dict]) -> dict:
    """Signals from a probe pass, given as (preprocessed batch, probe outputs) pairs from any runtime:
    input statistics, the BN divergence profile, and the original head's max-softmax and energy."""
    s1 = s2 = np.zeros(3)
    n_pix = n_img = 0
    sums = [np.zeros((2, len(ref["weight"]))) for ref in layers]
    max_softmax, energy, per_image = [], [], []
    for x, (_features, logits, *stats) in batches:
        x = x.astype(np.float64)
        s1, s2 = s1 + x.sum((0, 2, 3)), s2 + (x * x).sum((0, 2, 3))
        n_pix, n_img = n_pix + x.shape[0] * x.shape[2] * x.shape[3], n_img + x.shape[0]
        z = logits.astype(np.float64)
        top = z.max(1, keepdims=True)
        log_sum = top[:, 0] + np.log(np.exp(z - top).sum(1))
        max_softmax += np.exp(top[:, 0] - log_sum).tolist()
        energy += (-log_sum).tolist()
        own = np.zeros(x.shape[0])
        for acc, mean, meansq, ref in zip(sums, stats[0::2], stats[1::2], layers, strict=True):
            acc += [mean.astype(np.float64).sum(0), meansq.astype(np.float64).sum(0)]
            own += _log_kl(mean.astype(np.float64), meansq.astype(np.float64), ref).mean(-1)
        per_image += (own / max(len(layers), 1)).tolist()
    profile = (
        [
            {"layer": ref["layer"], "divergence": _divergence(acc / n_img, ref)}
            for acc, ref in zip(sums, layers, strict=True)
        ]
        if n_img
        else []
    )
    mean = s1 / max(n_pix, 1)
    std = np.sqrt(np.clip(s2 / max(n_pix, 1) - mean**2, 0, None))
    values = [p["divergence"] for p in profile]
    third = max(1, len(values) // 3)
    return {
        "n_images": n_img,
        "input_mean": [round(float(v), 4) for v in mean],  # in normalised units: 0 matches pretraining
        "input_std": [round(float(v), 4) for v in std],  # 1 matches pretraining
        "bn_layers": len(layers),
        "bn_divergence": float(np.mean(values)) if values else None,
        "bn_divergence_early": float(np.mean(values[:third])) if values else None,
        "bn_divergence_late": float(np.mean(values[-third:])) if values else None,
        "max_softmax": float(np.mean(max_softmax)) if max_softmax else None,
        "energy": float(np.mean(energy)) if energy else None,
        "profile": profile,
        # each image's own divergence (its spatial statistics, mean over layers): which images are
        # furthest from the pretraining data, in the order given; the run report shows the top ones
        "per_image": [v if math.isfinite(v) else 0.0 for v in per_image] if layers else [],
    }


def _divergence(moments: np.ndarray, ref: dict) -> float:
    """Mean over channels of log(1 + symmetric KL) between N(these images) and N(running statistics),
    for a layer's input, mapped back through the layer's affine map from the moments of its output
    less its bias (Probe): d = weight * (x - running_mean) / sqrt(running_var + eps)."""
    value = float(_log_kl(moments[0], moments[1], ref).mean())
    return value if math.isfinite(value) else 0.0


def _log_kl(mean_d: np.ndarray, meansq_d: np.ndarray, ref: dict) -> np.ndarray:
    """log(1 + symmetric KL) per channel (last axis) from the moments of a layer's output less its bias."""
    var_d = np.clip(meansq_d - mean_d**2, 0, None)
    w = np.where(np.abs(ref["weight"]) < 1e-8, 1e-8, ref["weight"])  # a dead channel: no information
    scale = np.sqrt(ref["running_var"] + ref["eps"]) / w
    mean_x = mean_d * scale + ref["running_mean"]
    var_x = var_d * scale**2
    v1, v2 = np.clip(var_x, EPS, None) + EPS, np.clip(ref["running_var"], EPS, None) + EPS
    kl = 0.5 * (v1 / v2 + v2 / v1) + 0.5 * (mean_x - ref["running_mean"]) ** 2 * (1 / v1 + 1 / v2) - 1
    return np.log1p(np.clip(kl, 0, None))


def reference(backbone: str) -> dict:
    """The calibrated thresholds shipped for a backbone (`headstart domain-calibrate` writes them);
    an uncalibrated backbone borrows efficientnet_lite0's and says so."""
    from importlib import resources

    folder = resources.files("headstart") / "domain_reference"
    name = backbone.replace("/", "_")
    path = folder / f"{name}.json"
    if not path.is_file():
        return {
            **json.loads((folder / "efficientnet_lite0.json").read_text()),
            "calibrated_for": name,
            "borrowed_from": "efficientnet_lite0",
        }
    return json.loads(path.read_text())


def verdict(signals: dict, ref: dict) -> tuple[str, float | None]:
    """in_domain / shifted / mismatch from the BN divergence and the calibrated thresholds."""
    score = signals.get("bn_divergence")
    if score is None:  # no BatchNorm: fall back to the pretrained head's confidence
        conf, t = signals.get("max_softmax"), ref["max_softmax_thresholds"]
        if conf is None:
            return "in_domain", None
        return (
            "in_domain"
            if conf >= t["shifted_below"]
            else "shifted"
            if conf >= t["mismatch_below"]
            else "mismatch"
        ), conf
    t = ref["thresholds"]
    return (
        "in_domain" if score < t["shifted_at"] else "shifted" if score < t["mismatch_at"] else "mismatch"
    ), score


def furthest(scores: list[float], paths: list[str], n: int = 16) -> list[dict]:
    """The n images with the highest own divergence (analyse's per_image), highest first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], paths[i]))[:n]
    return [{"path": paths[i], "divergence": round(scores[i], 4)} for i in order]


def auroc(inside: list[float], outside: list[float]) -> float:
    """P(score of an out-of-domain set > score of an in-domain set), ties counting half."""
    pairs = [(o > i) + 0.5 * (o == i) for i in inside for o in outside]
    return float(np.mean(pairs)) if pairs else float("nan")


def calibration_sets(seed: int = 0, per_set: int = 16, n_sets: int = 6) -> dict[str, list[list]]:
    """Offline image sets: natural photo crops (in domain) and clearly foreign images (out)."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    names = ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry", "motorcycle_left")
    photos = [getattr(data, n)() for n in names if hasattr(data, n)] + list(load_sample_images().images)

    def crop(img: np.ndarray) -> Image.Image:
        size = int(rng.integers(96, min(img.shape[:2])))
        y, x = (int(rng.integers(0, d - size + 1)) for d in img.shape[:2])
        return Image.fromarray(np.ascontiguousarray(img[y : y + size, x : x + size, :3]).astype(np.uint8))

    digits = load_digits().images
    sets: dict[str, list[list]] = {"photos": [], "digits": [], "noise": [], "flat_colour": []}
    for _ in range(n_sets):
        sets["photos"].append([crop(photos[int(rng.integers(len(photos)))]) for _ in range(per_set)])
        sets["digits"].append(
            [
                Image.fromarray((digits[int(rng.integers(len(digits)))] * 255 / 16).astype(np.uint8)).convert(
                    "RGB"
                )
                for _ in range(per_set)
            ]
        )
        sets["noise"].append(
            [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(per_set)]
        )
        sets["flat_colour"].append(
            [
                Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
                for _ in range(per_set)
            ]
        )
    return sets


def calibrate(probe: Probe, spec, seed: int = 0, per_set: int = 16, n_sets: int = 6) -> dict:
    """Scores of every calibration set; thresholds placed in the gap between in- and out-of-domain."""
    from headstart.preprocess import preprocess

    table = {}
    for name, groups in calibration_sets(seed, per_set, n_sets).items():
        table[name] = []
        for images in groups:
            x = np.stack([preprocess(im, spec) for im in images])
            s = analyse(run_probe(probe, [x]), probe.layers)
            table[name].append({"bn_divergence": s["bn_divergence"], "max_softmax": s["max_softmax"]})
    inside = [r["bn_divergence"] for r in table["photos"]]
    outside = [r["bn_divergence"] for k, v in table.items() if k != "photos" for r in v]
    lo, hi = max(inside), min(outside)
    conf_in = [r["max_softmax"] for r in table["photos"]]
    conf_out = [r["max_softmax"] for k, v in table.items() if k != "photos" for r in v]
    return {
        "thresholds": {
            "shifted_at": round(lo + 0.25 * (hi - lo), 4),
            "mismatch_at": round(hi - 0.1 * (hi - lo), 4),
        },
        "max_softmax_thresholds": {
            "shifted_below": round(min(conf_in), 4),
            "mismatch_below": round(max(conf_out), 4),
        },
        "auroc": round(auroc(inside, outside), 4),
        "table": {k: [round(r["bn_divergence"], 4) for r in v] for k, v in table.items()},
        "seed": seed,
    }


def input_summary(manifest_rows, size: int, resize_to: int) -> dict:
    """From the manifest, no decoding: how many images are grey, how much they get upscaled."""
    grey = (manifest_rows["channels"] == 1) | (
        (manifest_rows["mean_r"] == manifest_rows["mean_g"])
        & (manifest_rows["mean_g"] == manifest_rows["mean_b"])
    )
    short = np.minimum(manifest_rows["width"], manifest_rows["height"]).clip(lower=1)
    return {
        "grey_fraction": round(float(grey.mean()), 4) if len(grey) else 0.0,
        "median_upscale": round(float(np.median(resize_to / short)), 3) if len(short) else 1.0,
        "input_size": size,
    }


def to_markdown(report: dict) -> str:
    """The domain check for a Prefect artifact and the MLflow run."""
    s, t = report["signals"], report["thresholds"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"# Domain check: {report['verdict']} (score {f(report['score'])})",
        "",
        f"BatchNorm divergence {f(s['bn_divergence'])} (early layers {f(s['bn_divergence_early'])}, late "
        f"{f(s['bn_divergence_late'])}); thresholds: shifted at {t['shifted_at']}, mismatch at "
        f"{t['mismatch_at']}.",
        "",
        f"Pretrained head: max-softmax {f(s['max_softmax'])}, energy {f(s['energy'])}. Inputs (normalised; "
        f"pretraining = 0 and 1): mean {s['input_mean']}, std {s['input_std']}; "
        f"{s['grey_fraction']:.0%} grey, median upscale x{s['median_upscale']}.",
        "",
        f"Action on mismatch: {report['on_mismatch']}; {report['n_images']} training images checked.",
    ]
    return "\n".join(lines) + "\n"


def build_report(
    signals: dict, ref: dict, backbone: str, runtime: str, shared: int, on_mismatch: str
) -> dict:
    """The domain stage's report.json: the verdict against the calibrated reference, every signal,
    the per-layer profile, and how many features the pass shared with train_head's cache."""
    found, score = verdict(signals, ref)
    report = {
        "verdict": found,
        "score": None if score is None else round(score, 4),
        "on_mismatch": on_mismatch,
        "n_images": signals["n_images"],
        "backbone": backbone,
        "runtime": runtime,
        "features_shared": shared,
        "thresholds": ref["thresholds"],
        "reference": {k: ref[k] for k in ("auroc", "table") if k in ref}
        | {"borrowed_from": ref.get("borrowed_from")},
        "signals": {k: v for k, v in signals.items() if k not in ("profile", "per_image")},
        "profile": signals["profile"],
    }
    if signals["bn_layers"] == 0:
        report["note"] = f"{backbone} has no BatchNorm layers: verdict from the pretrained head's confidence"
    return report
