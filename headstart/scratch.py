"""A model trained from random initialisation: the alternative when transfer is the wrong tool (the
data is unlike the pretraining images, or there is enough of it to learn from the ground up).

The architecture is the CIFAR ResNet-20 of He et al. (2016, section 4.2): a 3x3 stem, three stages
of three basic blocks at 16/32/64 channels (strides 1/2/2, a 1x1 projection where the shape
changes), global average pooling and a linear layer. 0.27M parameters: 271,954 for two RGB classes,
272,474 for ten (+65 per class; grey input has 288 fewer). It is the usual small-image baseline
(91.3% on CIFAR-10 in the paper) at about 41 MFLOPs per 32 px image, so it trains on a CPU in
minutes on a few thousand images. ResNet-8 (78k parameters, one block per stage) has a third of the
depth and a much smaller receptive field, too little for 64-128 px inputs; ResNet-32/56 (0.47M/0.86M)
buy 1.2-1.8 points on CIFAR-10 (50,000 images) for 1.6-2.8x the compute, a gain a set of a few
thousand images is unlikely to show. The input side follows the data (32-128 px, see input_spec);
from 64 px on the stem has stride 2, so a 128 px image costs what a 64 px one would with stride 1
and the last stage still sees the whole image (8-16 px maps).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from headstart import HeadstartError
from headstart.checkpoint import EpochCheckpoint
from headstart.config import ScratchParams
from headstart.features import decoded
from headstart.finetune import Images, lr_lambda
from headstart.preprocess import InputSpec, decode, to_uint8
from headstart.provenance import code_hash, derive_key, library_versions
from headstart.training import balanced_order, class_weights, softmax

SIZES = (32, 128)  # input side: below 32 the two stride-2 stages leave nothing; above 128 costs 16x
STRIDE2_FROM = 64  # input side from which the stem has stride 2
CROP_AREA = (0.64, 1.0)  # of each training view: a mild random resized crop that keeps the subject
CROP_RATIO = (3 / 4, 4 / 3)
LUMA = (0.299, 0.587, 0.114)  # Pillow's RGB -> L weights


class Block(nn.Module):
    """A basic residual block: two 3x3 convolutions with BatchNorm, a projection shortcut on a shape
    change; the second BatchNorm starts at zero so each block starts as the identity (Goyal et al.)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(channels: int, num_classes: int, size: int, depth: int = 20) -> nn.Sequential:
    """The CIFAR ResNet of `depth` = 6n + 2 layers (20: n = 3 blocks per stage) for `channels`-deep
    images of side `size`, He-initialised."""
    if (depth - 2) % 6:
        raise HeadstartError(f"scratch: ResNet depth {depth} is not 6n + 2 (8, 14, 20, 32, ...)")
    n, layers, cin = (depth - 2) // 6, [], 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            layers.append(Block(cin, width, stride if i == 0 else 1))
            cin = width
    stem_stride = 2 if size >= STRIDE2_FROM else 1
    model = nn.Sequential(
        nn.Conv2d(channels, 16, 3, stem_stride, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(q.numel() for q in model.parameters())


def input_spec(
    manifest_rows: pd.DataFrame | Iterable[Mapping], size: int | str = "auto", channels: int | None = None
) -> InputSpec:
    """The scratch model's preprocessing contract from its TRAINING rows of prepare's manifest: the
    side (`auto`: the median shorter side, rounded to a multiple of 8, clamped to SIZES), grey (1
    channel) when every image is grey unless `channels` says, and the images' own mean/std. The
    eval transform resizes the shorter side to the side and centre-crops it (crop_pct 1)."""
    rows = pd.DataFrame(manifest_rows)
    if rows.empty:
        raise HeadstartError("scratch: no training images to take the input size and statistics from")
    channels = channels or (1 if _all_grey(rows) else 3)
    if channels not in (1, 3):
        raise HeadstartError(f"scratch: channels={channels}; a model takes 1 (grey) or 3 (RGB)")
    side = auto_size(rows) if size == "auto" else int(size)
    mean, std = pooled_stats(rows, channels)
    return InputSpec(side, mean, std, "bicubic", 1.0, channels)


def auto_size(rows: pd.DataFrame) -> int:
    shorter = np.minimum(rows["width"].to_numpy(), rows["height"].to_numpy())
    side = 8 * round(float(np.median(shorter)) / 8)
    return int(min(max(side, SIZES[0]), SIZES[1]))


def _all_grey(rows: pd.DataFrame) -> bool:
    m, s = rows[["mean_r", "mean_g", "mean_b"]].to_numpy(), rows[["std_r", "std_g", "std_b"]].to_numpy()
    return bool(np.allclose(m, m[:, :1], atol=1e-6) and np.allclose(s, s[:, :1], atol=1e-6))


def pooled_stats(rows: pd.DataFrame, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all the images' pixels, each image weighing the same (each is
    resized to the same side): from per-image mean m and std s, var = mean(s^2 + m^2) - mean(m)^2.
    Grey from colour images takes Pillow's luma weights (the std so is an upper bound; exact on grey)."""
    m = rows[["mean_r", "mean_g", "mean_b"]].to_numpy(np.float64)
    s = rows[["std_r", "std_g", "std_b"]].to_numpy(np.float64)
    if channels == 1:
        m, s = m @ np.array(LUMA)[:, None], s @ np.array(LUMA)[:, None]
    mean = m.mean(0)
    std = np.sqrt(np.maximum((s**2 + m**2).mean(0) - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)  # a flat set: no /0


def pixels(path, spec: InputSpec) -> np.ndarray:
    """One image as the model's eval view before normalisation: uint8 HWC, spec.channels deep (what
    the Predictor feeds the exported model: the same function)."""
    return to_uint8(decode(path, keep_grey=True), spec)


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Training views of a uint8 NHWC batch, as float NCHW (0-255) of the same side: each a random
    resized crop (CROP_AREA of the image, aspect CROP_RATIO, anywhere inside it), mirrored half the
    time only when `flip`. Every draw comes from `gen` (on the CPU), so views do not depend on the
    device; the same number of draws is made whether or not flips are allowed."""
    n, size = len(x), x.shape[1]
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    area = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[:, 0]
    ratio = torch.exp(math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * u[:, 1])
    sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    tx, ty = (2 * u[:, 2] - 1) * (1 - sw), (2 * u[:, 3] - 1) * (1 - sh)
    mirror = torch.where((u[:, 4] < 0.5) & flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * mirror, tx, sh, ty
    images = x.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta.float().to(x.device), [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Normalise(nn.Module):
    """(x/255 - mean)/std per channel, as headstart.preprocess.normalise computes it."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        std, mean = torch.tensor(spec.std).view(1, -1, 1, 1), torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.register_buffer("scale", (1 / 255) / std, persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale - self.shift


@dataclass
class ScratchResult:
    model: nn.Module  # on the CPU, in eval mode; takes normalised NCHW input (the spec's contract)
    classes: list[str]
    spec: InputSpec
    history: list[dict]
    best_epoch: int
    resumed_from: int
    parameters: int
    device: str
    amp: bool
    wall_s: float


def load_arrays(images: Images, spec: InputSpec, classes: list[str], desc: str) -> tuple[torch.Tensor, ...]:
    """Each image decoded once, as its uint8 eval view (N, side, side, channels), and its label index."""
    items = list(zip(images.shas, images.paths, strict=True))
    batches = [x for _, x in decoded(spec, items, 64, desc, load=lambda p: pixels(p, spec))]
    shape = (0, spec.size, spec.size, spec.channels)
    x = np.concatenate(batches) if batches else np.zeros(shape, np.uint8)
    y = np.array([classes.index(c) for c in images.labels], np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def train_scratch(
    train: Images,
    val: Images,
    spec: InputSpec,
    p: ScratchParams,
    seed: int,
    device: str,
    checkpoint: EpochCheckpoint,
    on_epoch: Callable[[dict], None] | None = None,
    classes: list[str] | None = None,
) -> ScratchResult:
    """Train the ResNet from random initialisation on `train`, early-stopped on `val`'s loss; seeded
    (same seed and device: the same history and weights), resumable from `checkpoint` (saved after
    every epoch, removed on success). `on_epoch` gets each epoch's history row (live curves)."""
    start = time.perf_counter()
    classes = classes or sorted(set(train.labels))
    (xt, yt), (xv, yv) = (
        load_arrays(s, spec, classes, f"scratch decode ({n})") for s, n in ((train, "train"), (val, "val"))
    )
    if not len(yt) or not len(yv):
        raise HeadstartError("scratch: training needs images in both the train and the val split")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    run = _Run(resnet(spec.channels, len(classes), spec.size), spec, p, device, len(yt), yt, len(classes))
    state = checkpoint.restore(run.model, run.opt, run.sched, run.scaler, gen) or _fresh()
    resumed_from = state["epoch"]
    xt, xv = xt.to(device), xv.to(device)
    for epoch in (bar := tqdm(range(state["epoch"] + 1, p.max_epochs + 1), desc="scratch", unit="epoch")):
        if state["waited"] >= p.patience:
            break
        row = {"epoch": epoch, "train_loss": run.epoch(xt, yt, gen)}
        row["val_loss"], row["val_accuracy"] = run.score(xv, yv)
        row["lr"] = run.opt.param_groups[0]["lr"]
        bar.set_postfix(
            val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.3f}", refresh=False
        )
        _record(state, row, run.model)
        if on_epoch:
            on_epoch(row)
        checkpoint.save(state, run.model, run.opt, run.sched, run.scaler, gen)
    if state["best_state"] is None:
        raise HeadstartError("scratch diverged: the validation loss was never finite; lower scratch.lr")
    model = run.model.cpu().to(memory_format=torch.contiguous_format)
    model.load_state_dict(state["best_state"])
    checkpoint.clear()
    wall = round(time.perf_counter() - start, 2)
    return ScratchResult(
        model.eval(), classes, spec, state["history"], state["best_epoch"], resumed_from,
        parameter_count(model), device, run.amp, wall,
    )  # fmt: skip


def _fresh() -> dict:
    return {"epoch": 0, "history": [], "best": float("inf"), "best_epoch": 0, "waited": 0, "best_state": None}


def _record(state: dict, row: dict, model: nn.Module) -> None:
    """Append the epoch's row; keep the weights when the validation loss improved (early stopping)."""
    state["history"].append(row)
    if row["val_loss"] < state["best"] - 1e-6:
        state.update(best=row["val_loss"], best_epoch=row["epoch"], waited=0)
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        state["waited"] += 1
    state["epoch"] = row["epoch"]


class _Run:
    """The model with its optimiser, schedule, scaler and losses: what one training run steps."""

    def __init__(self, model, spec: InputSpec, p: ScratchParams, device: str, n: int, y, k: int):
        self.fmt = torch.channels_last  # ~2x faster convolutions on a CPU; the same values
        self.model, self.norm = model.to(device, memory_format=self.fmt), Normalise(spec).to(device)
        self.p, self.device = p, device
        decay = [q for q in model.parameters() if q.ndim > 1]  # no decay on BatchNorm and biases
        rest = [q for q in model.parameters() if q.ndim <= 1]
        groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=p.lr)
        steps = math.ceil(n / p.batch_size)
        schedule = lr_lambda(p.warmup_epochs * steps, p.max_epochs * steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.amp = p.amp and device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        w = class_weights(y.numpy(), k).to(device) if p.class_balance == "weighted" else None
        self.loss = nn.CrossEntropyLoss(weight=w, label_smoothing=p.label_smoothing)
        self.val_loss = nn.CrossEntropyLoss(weight=w)  # as train_head measures it: comparable

    def epoch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
        """One pass over the training images (or a balanced draw of them); the mean training loss."""
        self.model.train()
        order = (
            balanced_order(y, gen)
            if self.p.class_balance == "sampler"
            else torch.randperm(len(y), generator=gen)
        )
        total = 0.0
        for i in range(0, len(y), self.p.batch_size):
            idx = order[i : i + self.p.batch_size]
            views = self.norm(augment(x[idx.to(x.device)], gen, self.p.flip)).contiguous(
                memory_format=self.fmt
            )
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                loss = self.loss(self.model(views).float(), y[idx].to(self.device))
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            total += loss.item() * len(idx)
        return total / len(y)

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
        """(loss, accuracy) on the eval views, in eval mode."""
        self.model.eval()
        logits = []
        for i in range(0, len(y), batch):
            views = self.norm(x[i : i + batch].permute(0, 3, 1, 2).float()).contiguous(memory_format=self.fmt)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                logits.append(self.model(views).float())
        out, y = torch.cat(logits), y.to(self.device)
        return self.val_loss(out, y).item(), (out.argmax(1) == y).float().mean().item()


def checkpoint_key(spec: InputSpec, p: ScratchParams, seed: int, device: str, *splits: Images) -> str:
    """What a scratch checkpoint belongs to: the data, the spec, the params, the seed, the device, and
    the code and libraries that train (derived, so a fix never resumes an old checkpoint)."""
    data = hashlib.sha256()
    for s in splits:
        data.update("".join(s.shas).encode() + b"|" + "".join(s.labels).encode() + b"|")
    return derive_key(
        "scratch",
        spec.to_json(),
        p.model_dump(mode="json"),
        [seed, device],
        data.hexdigest(),
        code_hash("headstart.scratch", "headstart.checkpoint", "headstart.training", "headstart.preprocess"),
        library_versions("torch", "numpy", "pillow"),
    )


# --- the model file and the stage's decisions ------------------------------------------------------

MODEL_FORMAT = "headstart.scratch/1"
DEPTH = 20


def model_bytes(result: ScratchResult, depth: int = DEPTH) -> bytes:
    """The trained model as a small, safe file (torch.load weights_only): the architecture's shape,
    the classes, the input spec and the tensors."""
    state = {
        "format": MODEL_FORMAT,
        "arch": "resnet",
        "depth": depth,
        "channels": result.spec.channels,
        "classes": list(result.classes),
        "spec": result.spec.to_json(),
        "state": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@dataclass
class ScratchModel:
    """A from-scratch model as evaluate and export use any model (see headstart.models)."""

    module: nn.Module  # takes normalised NCHW input, spec.channels deep
    spec: InputSpec
    classes: list[str]
    depth: int = DEPTH
    kind: str = "scratch"
    finetuned: bool = False

    def metadata(self) -> dict[str, str]:
        return {
            "headstart.model_kind": self.kind,
            "headstart.architecture": f"resnet{self.depth}",
            "headstart.parameters": str(parameter_count(self.module)),
        }

    def parameters(self) -> int:
        return parameter_count(self.module)

    def logits(self, paths, shas, runtime: str, cache_dir, batch_size: int) -> np.ndarray:
        """Logits over the eval views (decoded here: a scratch model has no feature cache)."""
        return self._run(self.module, len(self.classes), paths, shas, batch_size)

    def features(self, paths, shas, runtime: str, cache_dir, batch_size: int) -> np.ndarray:
        """The pooled features before the final linear layer (what the feature gate reads)."""
        return self._run(self.module[:-1], self.module[-1].in_features, paths, shas, batch_size)

    @torch.no_grad()
    def _run(self, net: nn.Module, width: int, paths, shas, batch_size: int) -> np.ndarray:
        norm, items = Normalise(self.spec), list(zip(shas, paths, strict=True))
        out = [
            net(norm(torch.from_numpy(x).permute(0, 3, 1, 2).float())).numpy()
            for _, x in decoded(
                self.spec, items, batch_size, "scratch (test)", load=lambda p: pixels(p, self.spec)
            )
        ]
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def probabilities(self, paths, shas, runtime: str, cache_dir, batch_size: int) -> np.ndarray:
        """Class probabilities: softmax(logits)."""
        return softmax(self.logits(paths, shas, runtime, cache_dir, batch_size))


def load_scratch(state: dict, source: str) -> ScratchModel:
    """Rebuild a model from model_bytes' dict (already loaded with weights_only)."""
    try:
        spec = InputSpec.from_json(state["spec"])
        module = resnet(state["channels"], len(state["classes"]), spec.size, state["depth"])
        module.load_state_dict(state["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise HeadstartError(f"{source}: a damaged from-scratch model file ({type(exc).__name__})") from None
    return ScratchModel(module.eval(), spec, list(state["classes"]), state["depth"])


def gate(p: ScratchParams, n_train: int, verdict: str, on_mismatch: str = "scratch") -> str | None:
    """Why the scratch model is not trained, or None when it is: `always`; `auto` on a domain
    mismatch (when domain.on_mismatch is `scratch`) or from scratch.min_train_images images."""
    if p.run == "never":
        return "scratch.run is never"
    if p.run == "always":
        return None
    if verdict == "mismatch" and on_mismatch == "scratch":
        return None
    if n_train >= p.min_train_images:
        return None
    why = f"domain verdict {verdict}" + (
        f" (domain.on_mismatch={on_mismatch} keeps transfer)" if verdict == "mismatch" else ""
    )
    return (
        f"{why} and {n_train} training images < scratch.min_train_images={p.min_train_images}: "
        "transfer is the right tool here (scratch.run=always trains it anyway)"
    )


def why_run(p: ScratchParams, n_train: int, verdict: str) -> str:
    """What opened the gate (call when gate() returned None)."""
    if p.run == "always":
        return "scratch.run is always"
    if verdict == "mismatch":
        return "domain verdict mismatch: transfer is doubtful, so a from-scratch model competes"
    return f"{n_train} training images >= scratch.min_train_images={p.min_train_images}: enough to learn from"


def too_small(train_counts: Mapping[str, int], val_counts: Mapping[str, int], minimum) -> str | None:
    """Why the splits cannot train a model from the ground up (a class under the split minimums
    `minimum`, validate.min_per_split, with at least 2 training and 1 validation image), or None."""
    need_train, need_val = max(2, minimum.train), max(1, minimum.val)
    for c in sorted(train_counts.keys() | val_counts.keys()):
        t, v = train_counts.get(c, 0), val_counts.get(c, 0)
        if t < need_train or v < need_val:
            return (
                f"too small for a from-scratch model: class {c!r} has {t} training and {v} validation "
                f"images (it needs {need_train} and {need_val}: validate.min_per_split); transfer is kept"
            )
    return None


def to_markdown(d: dict) -> str:
    """The scratch stage's decision for a Prefect artifact and the MLflow run."""
    lines = [f"# From scratch: {'trained' if d['ran'] else 'not trained'}", "", d["reason"], ""]
    if d["ran"]:
        lines += [
            f"ResNet-{d['depth']}, {d['parameters']:,} parameters, input {d['input']}; "
            f"{d['epochs_run']} epochs on {d['device']} (best {d['best_epoch']}), {d['wall_s']} s.",
            "",
            f"Validation accuracy {d['val_accuracy']:.4f}, loss {d['val_loss']:.4f}.",
        ]
    return "\n".join(lines) + "\n"
