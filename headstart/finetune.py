"""Fine-tuning the last blocks of the backbone together with the head: gated, frozen where it says
frozen, resumable, and kept only when it beats the head alone on validation.

The frozen part of the backbone never changes, so its output for each image is computed once (the
"prefix" pass) and every epoch runs only the unfrozen tail and the head: epochs cost a fraction of a
full forward and backward pass. BatchNorm layers stay in eval mode in every phase (their running
statistics and affine parameters never change), which is the keras#10045 / Lightning #13902 trap.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from headstart import HeadstartError
from headstart.checkpoint import EpochCheckpoint, bn_modules
from headstart.config import FinetuneParams, TrainHeadParams
from headstart.features import decoded
from headstart.provenance import code_hash, derive_key, library_versions
from headstart.training import (
    balanced_order,
    class_weights,
    load_model,
    model_bytes,
    proven_frozen,
)

EXPANDED = ("blocks", "features", "stages", "layers")  # containers whose children run one after another


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """train()/eval() for everything but BatchNorm, which stays in eval mode in every phase."""
    model.train(training)
    for m in bn_modules(model):
        m.eval()
    return model


@dataclass
class Partition:
    """The backbone as prefix (frozen, computed once per image) and tail (partly trainable)."""

    prefix: nn.Module
    tail: nn.Module
    units: list[str]  # every unit, input side first
    unfrozen: list[str]  # the units the tail trains
    trainable: list[str] = field(default_factory=list)  # parameter names (in the extractor)
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # the tail's, by extractor name


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def partition_backbone(extractor: nn.Module, unfreeze: int | str, size: int) -> Partition:
    """Cut the feature extractor before its last `unfreeze` units (a block, or a layer with its
    BatchNorm); `all` unfreezes everything but BatchNorm. Checked on a dummy image: prefix + tail
    must compute exactly what the extractor computes."""
    stages: list[tuple[str, nn.Module]] = []
    for name, child in extractor.named_children():
        if name in EXPANDED and isinstance(child, nn.Sequential):
            stages += [(f"{name}.{n}", m) for n, m in child.named_children()]
        else:
            stages.append((name, child))
    # a unit is a stage holding parameters, with any BatchNorm-only stage after it
    units: list[list[int]] = []
    for i, (_, m) in enumerate(stages):
        params = list(m.parameters(recurse=True))
        if not params:
            continue
        if units and isinstance(m, nn.modules.batchnorm._BatchNorm):
            units[-1].append(i)
        else:
            units.append([i])
    if not units:
        raise HeadstartError("finetune: the backbone has no parameters to unfreeze")
    n = len(units) if unfreeze == "all" else int(unfreeze)
    if not 1 <= n <= len(units):
        raise HeadstartError(
            f"finetune.unfreeze={unfreeze}: the backbone has {len(units)} units (1..{len(units)})"
        )
    cut = units[-n][0] if n < len(units) else 0
    prefix = nn.Sequential(*[m for _, m in stages[:cut]])
    tail = nn.Sequential(*[m for _, m in stages[cut:]], _Flat())
    with torch.no_grad():
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        extractor.eval()
        ok = torch.allclose(tail(prefix(x)), extractor(x).flatten(1), atol=1e-5, rtol=1e-4)
    if not ok:
        if unfreeze != "all":
            raise HeadstartError(
                "finetune: this backbone's forward is not a chain of its blocks; use finetune.unfreeze=all"
            )
        prefix, tail = nn.Sequential(), nn.Sequential(extractor, _Flat())
        cut = 0
    names = [stages[u[0]][0] for u in units]
    trainable_ids = {id(p) for i in range(cut, len(stages)) for p in stages[i][1].parameters()}
    bn_ids = {id(p) for m in bn_modules(extractor) for p in m.parameters()}
    trainable = [k for k, p in extractor.named_parameters() if id(p) in trainable_ids - bn_ids]
    in_tail = {id(q) for q in tail.parameters()}
    params = {k: q for k, q in extractor.named_parameters() if id(q) in in_tail}
    return Partition(prefix, tail, names, names[len(names) - n :], trainable, params)


@torch.inference_mode()
def run_prefix(prefix: nn.Module, batches, device: str) -> torch.Tensor:
    """The frozen prefix's output for every image, once (eval mode, no gradients)."""
    fmt = torch.channels_last  # same values, ~2x faster convolutions on a CPU
    prefix = prefix.eval().to(device, memory_format=fmt)
    outs = [
        prefix(torch.from_numpy(x).to(device, memory_format=fmt)).float().cpu().contiguous() for x in batches
    ]
    return torch.cat(outs) if outs else torch.zeros(0)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is on disk (tests kill the run here)."""


@dataclass
class FitResult:
    tail: nn.Module
    head: nn.Module
    history: list[dict]
    best_epoch: int
    resumed_from: int


def fit(
    split: Partition,
    head: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    p: FinetuneParams,
    seed: int,
    device: str,
    class_weights: torch.Tensor | None,
    checkpoint: Path,
    key: str,
    balanced: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train tail + head on prefix outputs: discriminative learning rates, warm-up then cosine,
    gradient clipping, AMP on CUDA, early stopping on validation loss; a checkpoint after every
    epoch, from which a killed run resumes to the same result as an uninterrupted one. `on_epoch`
    gets each epoch's history row as it is computed (live curves)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tail, head = split.tail.to(device), head.to(device)
    trainable = set(split.trainable)
    for name, param in split.params.items():
        param.requires_grad_(name in trainable)
    for param in head.parameters():
        param.requires_grad_(True)
    backbone_params = [split.params[n] for n in split.trainable]
    opt = torch.optim.AdamW(
        [
            {"params": list(head.parameters()), "lr": p.lr, "name": "head"},
            {"params": backbone_params, "lr": p.lr * p.backbone_lr_ratio, "name": "backbone"},
        ],
        weight_decay=p.weight_decay,
    )
    steps = math.ceil(len(train[1]) / p.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p.warmup_epochs * steps, p.max_epochs * steps))
    amp = p.amp and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loss_fn = nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(device))
    model = nn.Sequential(tail, head)
    state = {
        "epoch": 0,
        "history": [],
        "best": float("inf"),
        "best_epoch": 0,
        "waited": 0,
        "best_state": None,
    }
    saved = _checkpoint(checkpoint, key)
    state = saved.restore(model, opt, sched, scaler, gen) or state
    resumed_from = state["epoch"]
    xt, yt = train
    for epoch in (bar := tqdm(range(state["epoch"] + 1, p.max_epochs + 1), desc="finetune", unit="epoch")):
        if state["waited"] >= p.patience:
            break
        set_train_mode(model, True)
        order = balanced_order(yt, gen) if balanced else torch.randperm(len(yt), generator=gen)
        total = 0.0
        for i in range(0, len(yt), p.batch_size):
            idx = order[i : i + p.batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = loss_fn(model(xt[idx].to(device)), yt[idx].to(device))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], p.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(idx)
        val_loss, val_acc = score(model, val, device, loss_fn)
        state["history"].append(
            {
                "epoch": epoch,
                "train_loss": total / len(yt),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr_head": opt.param_groups[0]["lr"],
                "lr_backbone": opt.param_groups[1]["lr"],
            }
        )
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}", refresh=False)
        if on_epoch:
            on_epoch(state["history"][-1])
        if val_loss < state["best"] - 1e-6:
            state.update(best=val_loss, best_epoch=epoch, waited=0)
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["waited"] += 1
        state["epoch"] = epoch
        saved.save(state, model, opt, sched, scaler, gen)  # then the after-epoch hook
    if state["best_state"] is None:
        raise HeadstartError("finetune diverged: the validation loss was never finite; lower finetune.lr")
    model.load_state_dict(state["best_state"])
    set_train_mode(model, False)
    return FitResult(tail.cpu(), head.cpu(), state["history"], state["best_epoch"], resumed_from)


@torch.no_grad()
def score(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], device: str, loss_fn, batch: int = 256
) -> tuple[float, float]:
    """(loss, accuracy) in eval mode."""
    set_train_mode(model, False)
    x, y = data
    logits = torch.cat([model(x[i : i + batch].to(device)).float() for i in range(0, len(y), batch)])
    y = y.to(device)
    return loss_fn(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _checkpoint(path: Path, key: str, hook: bool = True) -> EpochCheckpoint:
    # BatchNorm never trains here; the hook is looked up at call time, so tests can replace it
    after = (lambda e: _after_epoch(e)) if hook else (lambda e: None)
    return EpochCheckpoint(path, key, "fine-tuning", frozen_bn=True, after_epoch=after)


def _save(path: Path, key: str, state: dict, *objects) -> None:
    """fit's checkpoint write, without the after-epoch hook."""
    _checkpoint(path, key, hook=False).save(state, *objects)


def _restore(path: Path, key: str, *objects) -> dict | None:
    return _checkpoint(path, key).restore(*objects)


def gate(p: FinetuneParams, n_train: int, verdict: str, head_refit: bool = False) -> str | None:
    """Why fine-tuning must not run, or None when it may."""
    if not p.enabled:
        return "finetune.enabled is false"
    if n_train < p.min_train_images:
        return (
            f"{n_train} training images < finetune.min_train_images={p.min_train_images}: too few to "
            f"unfreeze backbone blocks without overfitting; the head alone is kept"
        )
    if head_refit:  # the keep rule compares on val, which the refit head trained on
        return (
            "the head was refit on train+val by train_head's cross-validated search: no clean validation "
            "split is left to judge fine-tuning on; lower train_head.search.cv_max_images to fine-tune"
        )
    if p.require_shifted and verdict != "shifted":
        return f"domain verdict is {verdict}, and finetune.require_shifted asks for shifted"
    return None


def resolve_device(choice: str, key: str = "finetune.device") -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise HeadstartError(f"{key}=cuda, but torch sees no CUDA device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def keep(tuned: float, base: float, margin: float) -> tuple[bool, str]:
    """The keep rule: the fine-tuned model's validation accuracy must beat the head alone's, measured
    the same way on the same images, by at least `margin` (and by something)."""
    gain = tuned - base
    if gain > 0 and gain >= margin:
        return True, (
            f"fine-tuned val accuracy {tuned:.4f} beats the head alone ({base:.4f}) by "
            f"{gain:+.4f} >= margin {margin}"
        )
    return False, (
        f"fine-tuned val accuracy {tuned:.4f} vs the head alone {base:.4f} ({gain:+.4f}) does not "
        f"clear finetune.margin={margin}: the head-only model is kept"
    )


@dataclass
class Images:
    """One split's images as fine-tuning reads them."""

    paths: list[Path]
    shas: list[str]
    labels: list[str]


@dataclass
class Tuned:
    decision: dict
    history: list[dict]
    model: bytes  # the model file evaluate and export use: fine-tuned, or the head-only one as it was


def checkpoint_key(
    head: bytes, p: FinetuneParams, seed: int, balance: str, device: str, *splits: Images
) -> str:
    """What a checkpoint belongs to: the head-only model, the data, the params, the seed, the device,
    and the code and libraries that train (derived, so a fix never resumes an old checkpoint)."""
    data = hashlib.sha256()
    for s in splits:
        data.update("".join(s.shas).encode() + b"|" + "".join(s.labels).encode() + b"|")
    return derive_key(
        hashlib.sha256(head).hexdigest(),
        p.model_dump(mode="json"),
        [seed, balance, device],
        data.hexdigest(),
        code_hash("headstart.finetune", "headstart.checkpoint", "headstart.training", "headstart.preprocess"),
        library_versions("torch", "numpy", "pillow"),
    )


def tune(
    head_file: Path,
    train: Images,
    val: Images,
    p: FinetuneParams,
    th: TrainHeadParams,
    seed: int,
    cache_dir: Path,
    on_epoch: Callable[[dict], None] | None = None,
) -> Tuned:
    """The open gate: unfreeze the last blocks, train them with the head from the head-only model,
    prove every other tensor unchanged, and keep the result only by the keep rule."""
    start, device = time.perf_counter(), resolve_device(p.device)
    model = load_model(head_file)
    classes, spec = model.classes, model.backbone.spec
    extractor = model.backbone.feature_extractor()
    part = partition_backbone(extractor, p.unfreeze, spec.size)
    with proven_frozen(extractor, part.trainable, "finetune") as frozen:
        data = {}
        for name, images in (("train", train), ("val", val)):
            items = list(zip(images.shas, images.paths, strict=True))
            x = run_prefix(
                part.prefix, (x for _, x in decoded(spec, items, p.batch_size, f"prefix ({name})")), device
            )
            data[name] = (x, torch.tensor(np.array([classes.index(c) for c in images.labels], np.int64)))
        head = copy.deepcopy(model.classifier.head)
        weights = (
            class_weights(data["train"][1].numpy(), len(classes)) if th.class_balance == "weighted" else None
        )
        loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
        base_loss, base_acc = score(nn.Sequential(part.tail, head).to(device), data["val"], device, loss_fn)
        key = checkpoint_key(head_file.read_bytes(), p, seed, th.class_balance, device, train, val)
        checkpoint = cache_dir / "finetune" / key / "checkpoint.pt"
        balanced = th.class_balance == "sampler"  # the same choice as the head's training
        result = fit(
            part,
            head,
            data["train"],
            data["val"],
            p,
            seed,
            device,
            weights,
            checkpoint,
            key,
            balanced,
            on_epoch,
        )
    best = result.history[result.best_epoch - 1]
    kept, reason = keep(best["val_accuracy"], base_acc, p.margin)
    decision = {
        "finetuned": kept,
        "reason": reason,
        "gate_open": True,
        "val_accuracy_head_only": base_acc,
        "val_loss_head_only": base_loss,
        "val_accuracy_finetuned": best["val_accuracy"],
        "val_loss_finetuned": best["val_loss"],
        "unfrozen": part.unfrozen,
        "trainable_parameters": int(sum(part.params[n].numel() for n in part.trainable)),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "resumed_from_epoch": result.resumed_from,
        "device": device,
        "amp": p.amp and device == "cuda",
        "frozen_check": frozen,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    blob = head_file.read_bytes()
    if kept:
        state = extractor.state_dict()
        blob = model_bytes(
            model.backbone,
            result.head,
            classes,
            th,
            backbone_state={n: state[n] for n in part.trainable},
            extra={"finetune": {"unfrozen": part.unfrozen, "frozen_sha256": frozen["sha256"]}},
        )
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return Tuned(decision, result.history, blob)


def to_markdown(d: dict) -> str:
    """The fine-tuning decision for a Prefect artifact and the MLflow run."""

    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    g = d["gate"]
    lines = [
        f"# Fine-tuning: {'kept' if d['finetuned'] else 'not used'}",
        "",
        d["reason"],
        "",
        f"Gate: {g['n_train']} training images (min {g['min_train_images']}), domain verdict "
        f"{g['domain_verdict']} (require shifted: {g['require_shifted']}); gate "
        f"{'open' if d['gate_open'] else 'closed'}.",
        "",
        f"Validation accuracy: head only {f(d['val_accuracy_head_only'])}, fine-tuned "
        f"{f(d['val_accuracy_finetuned'])}.",
    ]
    if d["gate_open"]:
        lines += [
            "",
            f"Unfrozen: {', '.join(d['unfrozen'])} ({d['trainable_parameters']:,} parameters); "
            f"{d['epochs_run']} epochs on {d['device']}, best {d['best_epoch']}, {d['wall_s']} s; "
            f"{d['frozen_check']['tensors']} frozen tensors unchanged.",
        ]
    return "\n".join(lines) + "\n"
