"""select: the one place that decides which model evaluate, export and register use: the transfer
model (finetune/model.pt) or the from-scratch one (scratch/model/model.pt, when it trained), by
validation accuracy then loss, a tie within select.margin going to transfer (headstart.selection).
select/model.pt is the chosen file, byte for byte."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.config import Params
from headstart.selection import (
    choose,
    scratch_candidate,
    to_markdown,
    transfer_candidate,
    val_images,
    val_line,
    with_interval,
)
from tasks import _inputs


@dataclass
class SelectResult:
    chosen: str
    kind: str
    reason: str
    val: str = ""  # the chosen candidate's val accuracy with its CI, for the run summary


def select(cfg: Params) -> SelectResult:
    head = _inputs.read_json(cfg, "train_head", "metrics.json")
    scratch = _inputs.read_json(cfg, "scratch", "decision.json")
    b = cfg.promote.n_bootstrap, cfg.promote.confidence, cfg.project.seed  # promotion's bootstrap
    transfer = transfer_candidate(head, _inputs.read_json(cfg, "finetune", "decision.json"))
    transfer = with_interval(transfer, val_images(head, transfer["kind"]), *b)
    other = scratch_candidate(scratch)
    other = other and with_interval(other, val_images(head, "scratch"), *b)
    chosen, reason = choose(transfer, other, cfg.select.margin)
    d = {"chosen": chosen["name"], "kind": chosen["kind"], "reason": reason, "margin": cfg.select.margin}
    d |= {"candidates": [c for c in (transfer, other) if c], "scratch_reason": scratch["reason"]}
    model = _inputs.stage_file(cfg, *_inputs.MODEL_FILES[chosen["name"]]).read_bytes()
    with directory(cfg.stage_dir("select")) as out:
        write_bytes(out / "model.pt", model)
        write_json(out / "decision.json", d)
        write_text(out / "summary.md", to_markdown(d))
    return SelectResult(d["chosen"], d["kind"], reason, val_line(chosen))
