"""finetune: unfreeze the backbone's last blocks, only when the data says so, and keep the result only
when it beats the head alone on validation. Always writes finetune/model.pt: the model evaluate and
export use (the head-only model, unchanged, when the gate is closed or fine-tuning did not help)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from headstart import HeadstartError
from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.config import Params
from headstart.features import decoded
from headstart.finetune import fit, run_prefix, score, split_backbone
from headstart.tracking import curve_logger
from headstart.training import (
    changed,
    class_weights,
    digest,
    fingerprint,
    frozen_tensors,
    load_model,
    model_bytes,
)
from tasks import _inputs


@dataclass
class FinetuneResult:
    finetuned: bool
    reason: str
    val_accuracy_before: float | None
    val_accuracy_after: float | None


def gate(cfg: Params, n_train: int, verdict: str) -> str | None:
    """Why fine-tuning must not run, or None when it may."""
    p = cfg.finetune
    if not p.enabled:
        return "finetune.enabled is false"
    if n_train < p.min_train_images:
        return (
            f"{n_train} training images < finetune.min_train_images={p.min_train_images}: too few to "
            f"unfreeze backbone blocks without overfitting; the head alone is kept"
        )
    if p.require_shifted and verdict != "shifted":
        return f"domain verdict is {verdict}, and finetune.require_shifted asks for shifted"
    return None


def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise HeadstartError("finetune.device=cuda, but torch sees no CUDA device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def finetune(cfg: Params) -> FinetuneResult:
    p = cfg.finetune
    head_file = _inputs.stage_file(cfg, "train_head", "model.pt")
    frame = _inputs.manifest(cfg)
    verdict = _inputs.read_json(cfg, "domain", "report.json")["verdict"]
    train_rows, train_paths = _inputs.split_paths(cfg, frame, "train")
    inputs = {
        "n_train": len(train_rows),
        "min_train_images": p.min_train_images,
        "domain_verdict": verdict,
        "require_shifted": p.require_shifted,
        "enabled": p.enabled,
    }
    closed = gate(cfg, len(train_rows), verdict)
    head_val = _inputs.read_json(cfg, "train_head", "metrics.json")["val_accuracy"]
    if closed:
        decision = {
            "finetuned": False,
            "reason": closed,
            "gate": inputs,
            "gate_open": False,
            "val_accuracy_head_only": head_val,
            "val_accuracy_finetuned": None,
        }
        _write(cfg, decision, [], head_file.read_bytes())
        return FinetuneResult(False, closed, head_val, None)

    start = time.perf_counter()
    device = resolve_device(p.device)
    model = load_model(head_file)
    classes, spec = model.classes, model.backbone.spec
    extractor = model.backbone.feature_extractor()
    split = split_backbone(extractor, p.unfreeze, spec.size)
    before = fingerprint(frozen_tensors(extractor, split.trainable))
    val_rows, val_paths = _inputs.split_paths(cfg, frame, "val")
    if val_rows.empty:
        raise HeadstartError("finetune needs a validation split to decide; raise prepare.val_fraction")
    data = {}
    for name, rows, paths in (("train", train_rows, train_paths), ("val", val_rows, val_paths)):
        items = list(zip(rows["sha256"], paths, strict=True))
        x = run_prefix(
            split.prefix, (x for _, x in decoded(spec, items, p.batch_size, f"prefix ({name})")), device
        )
        data[name] = (x, torch.tensor(rows["label"].map(classes.index).to_numpy(np.int64)))
    head = copy.deepcopy(model.classifier.head)
    weights = (
        class_weights(data["train"][1].numpy(), len(classes))
        if cfg.train_head.class_balance == "weighted"
        else None
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    base = torch.nn.Sequential(split.tail, head).to(device)
    base_loss, base_acc = score(base, data["val"], device, loss_fn)  # the head alone, same path
    key = _key(cfg, head_file, train_rows, val_rows, device)
    checkpoint = cfg.project.cache_dir / "finetune" / key / "checkpoint.pt"
    balanced = cfg.train_head.class_balance == "sampler"  # the same choice as the head's training
    result = fit(
        split,
        head,
        data["train"],
        data["val"],
        p,
        cfg.project.seed,
        device,
        weights,
        checkpoint,
        key,
        balanced,
        on_epoch=curve_logger(
            cfg, "finetune", offset=_inputs.read_json(cfg, "train_head", "metrics.json")["epochs_run"]
        ),
    )
    after = fingerprint(frozen_tensors(extractor, split.trainable))
    if moved := changed(before, after):
        raise HeadstartError(
            f"finetune: {len(moved)} tensors that must stay frozen changed (e.g. {moved[:3]}); "
            "the model is not saved"
        )
    best = result.history[result.best_epoch - 1]
    gain = best["val_accuracy"] - base_acc
    keep = gain > 0 and gain >= p.margin
    reason = (
        f"fine-tuned val accuracy {best['val_accuracy']:.4f} beats the head alone ({base_acc:.4f}) by "
        f"{gain:+.4f} >= margin {p.margin}"
        if keep
        else f"fine-tuned val accuracy {best['val_accuracy']:.4f} vs the head alone {base_acc:.4f} "
        f"({gain:+.4f}) does not clear finetune.margin={p.margin}: the head-only model is kept"
    )
    decision = {
        "finetuned": keep,
        "reason": reason,
        "gate": inputs,
        "gate_open": True,
        "val_accuracy_head_only": base_acc,
        "val_loss_head_only": base_loss,
        "val_accuracy_finetuned": best["val_accuracy"],
        "val_loss_finetuned": best["val_loss"],
        "unfrozen": split.unfrozen,
        "trainable_parameters": int(sum(split.params[n].numel() for n in split.trainable)),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "resumed_from_epoch": result.resumed_from,
        "device": device,
        "amp": p.amp and device == "cuda",
        "frozen_check": {"tensors": len(after), "sha256": digest(after), "unchanged": True},
        "wall_s": round(time.perf_counter() - start, 2),
    }
    if keep:
        state = extractor.state_dict()
        blob = model_bytes(
            model.backbone,
            result.head,
            classes,
            cfg.train_head,
            backbone_state={n: state[n] for n in split.trainable},
            extra={"finetune": {"unfrozen": split.unfrozen, "frozen_sha256": digest(after)}},
        )
    else:
        blob = head_file.read_bytes()
    _write(cfg, decision, result.history, blob)
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return FinetuneResult(keep, reason, base_acc, best["val_accuracy"])


def _key(cfg: Params, head_file, train_rows, val_rows, device: str) -> str:
    """What a checkpoint belongs to: the head-only model, the data, the params, the seed, the device."""
    h = hashlib.sha256(head_file.read_bytes())
    h.update(json.dumps(cfg.finetune.model_dump(mode="json"), sort_keys=True).encode())
    h.update(f"{cfg.project.seed}|{cfg.train_head.class_balance}|{device}".encode())
    for rows in (train_rows, val_rows):
        h.update("".join(rows["sha256"]).encode() + b"|" + "".join(rows["label"]).encode())
    return h.hexdigest()[:20]


def _write(cfg: Params, decision: dict, history: list[dict], model_bytes: bytes) -> None:
    with directory(cfg.stage_dir("finetune")) as out:
        write_bytes(out / "model.pt", model_bytes)
        write_json(out / "decision.json", decision)
        write_json(out / "history.json", history)
        write_text(out / "summary.md", to_markdown(decision))


def to_markdown(d: dict) -> str:
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
