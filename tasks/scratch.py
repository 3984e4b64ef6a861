"""scratch: a ResNet-20 from random initialisation, when the evidence says transfer may be the wrong
tool (a domain mismatch, or a large training split) or scratch.run=always; select weighs it against
the transfer model. scratch/model/ holds model.pt only when it trained (an always-present folder out)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.checkpoint import EpochCheckpoint
from headstart.config import Params
from headstart.finetune import Images, resolve_device
from headstart.scratch import (
    checkpoint_key,
    gate,
    input_spec,
    model_bytes,
    to_markdown,
    too_small,
    train_scratch,
    why_run,
)
from headstart.tracking import curve_logger
from tasks import _inputs


@dataclass
class ScratchStageResult:
    ran: bool
    reason: str
    val_accuracy: float | None
    wall_s: float | None


def scratch(cfg: Params) -> ScratchStageResult:
    p, frame, seed = cfg.scratch, _inputs.manifest(cfg), cfg.project.seed
    verdict = _inputs.read_json(cfg, "domain", "report.json")["verdict"]
    (rows, train), (val_rows, val) = (_images(cfg, frame, s) for s in ("train", "val"))
    d = {"ran": False, "gate": {"run": p.run, "n_train": len(train.paths), "domain_verdict": verdict}}
    d["gate"] |= {"min_train_images": p.min_train_images, "on_mismatch": cfg.domain.on_mismatch}
    counts = [x["label"].value_counts().to_dict() for x in (rows, val_rows)]
    d["reason"] = gate(p, len(train.paths), verdict, cfg.domain.on_mismatch) or too_small(
        *counts, cfg.validate.min_per_split
    )
    result = None
    if d["reason"] is None:
        device, spec = resolve_device(p.device, "scratch.device"), input_spec(rows, p.size)
        key = checkpoint_key(spec, p, seed, device, train, val)
        saved = EpochCheckpoint(cfg.project.cache_dir / "scratch" / key / "checkpoint.pt", key, "scratch")
        live = curve_logger(cfg, "scratch", prefix="scratch_curve")
        classes = sorted(frame["label"].unique())  # the transfer model's order: the same outputs
        result = train_scratch(train, val, spec, p, seed, device, saved, live, classes)
        shutil.rmtree(saved.path.parent, ignore_errors=True)
        best = result.history[result.best_epoch - 1]
        d.update(ran=True, reason=why_run(p, len(train.paths), verdict), depth=20, spec=spec.to_json())
        d.update(
            {k: best[k] for k in ("val_accuracy", "val_loss")}, input=f"{spec.size} px x {spec.channels}"
        )
        d.update(parameters=result.parameters, wall_s=result.wall_s, device=result.device, amp=result.amp)
        d.update(
            best_epoch=result.best_epoch, epochs_run=len(result.history), resumed_from=result.resumed_from
        )
    with directory(cfg.stage_dir("scratch")) as out:
        (out / "model").mkdir()  # declared to DVC even when nothing trained
        if result is not None:
            write_bytes(out / "model" / "model.pt", model_bytes(result))
        write_json(out / "decision.json", d)
        write_json(out / "history.json", result.history if result else [])
        write_text(out / "summary.md", to_markdown(d))
    return ScratchStageResult(d["ran"], d["reason"], d.get("val_accuracy"), d.get("wall_s"))


def _images(cfg: Params, frame, split: str):
    rows, paths = _inputs.split_paths(cfg, frame, split)
    return rows, Images(paths, list(rows["sha256"]), list(rows["label"]))
