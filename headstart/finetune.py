"""Fine-tuning the last blocks of the backbone together with the head: gated, frozen where it says
frozen, resumable, and kept only when it beats the head alone on validation.

The frozen part of the backbone never changes, so its output for each image is computed once (the
"prefix" pass) and every epoch runs only the unfrozen tail and the head: epochs cost a fraction of a
full forward and backward pass. BatchNorm layers stay in eval mode in every phase (their running
statistics and affine parameters never change), which is the keras#10045 / Lightning #13902 trap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from headstart import HeadstartError
from headstart.atomic import write_bytes
from headstart.config import FinetuneParams
from headstart.training import balanced_order

EXPANDED = ("blocks", "features", "stages", "layers")  # containers whose children run one after another


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """train()/eval() for everything but BatchNorm, which stays in eval mode in every phase."""
    model.train(training)
    for m in bn_modules(model):
        m.eval()
    return model


@dataclass
class Split:
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


def split_backbone(extractor: nn.Module, unfreeze: int | str, size: int) -> Split:
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
    return Split(prefix, tail, names, names[len(names) - n :], trainable, params)


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
    split: Split,
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
    resumed_from = 0
    if checkpoint.exists():
        state = _restore(checkpoint, key, model, opt, sched, scaler, gen)
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
        _save(checkpoint, key, state, model, opt, sched, scaler, gen)
        _after_epoch(epoch)
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


def _save(path: Path, key: str, state: dict, model, opt, sched, scaler, gen) -> None:
    blob = {
        "key": key,
        "state": {k: v for k, v in state.items() if k != "best_state"},
        "best_state": state["best_state"],
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "requires_grad": {n: q.requires_grad for n, q in model.named_parameters()},
        "bn_training": [m.training for m in bn_modules(model)],
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_bytes(path, buf.getvalue())


def _restore(path: Path, key: str, model, opt, sched, scaler, gen) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HeadstartError(
            f"finetune checkpoint {path} is unreadable ({type(exc).__name__}); delete it"
        ) from None
    if blob.get("key") != key:
        raise HeadstartError(f"finetune checkpoint {path} belongs to other inputs; delete it")
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    gen.set_state(blob["generator"])
    torch.set_rng_state(blob["torch_rng"])
    for n, q in model.named_parameters():
        q.requires_grad_(blob["requires_grad"][n])
    if any(blob["bn_training"]):
        raise HeadstartError(f"finetune checkpoint {path} has BatchNorm in training mode; delete it")
    return {**blob["state"], "best_state": blob["best_state"]}
