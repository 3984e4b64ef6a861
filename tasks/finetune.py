"""finetune: unfreeze the backbone's last blocks, only when the data says so, and keep the result only
when it beats the head alone on validation. Always writes finetune/model.pt: the model evaluate and
export use (the head-only model, unchanged, when the gate is closed or fine-tuning did not help)."""

from __future__ import annotations

from dataclasses import dataclass

from headstart import HeadstartError
from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.config import Params
from headstart.finetune import Images, Tuned, gate, to_markdown, tune
from headstart.search import chosen_params
from headstart.tracking import curve_logger
from tasks import _inputs


@dataclass
class FinetuneResult:
    finetuned: bool
    reason: str
    val_accuracy_before: float | None
    val_accuracy_after: float | None


def finetune(cfg: Params) -> FinetuneResult:
    p, frame = cfg.finetune, _inputs.manifest(cfg)
    head_file = _inputs.stage_file(cfg, "train_head", "model.pt")
    verdict = _inputs.read_json(cfg, "domain", "report.json")["verdict"]
    head_metrics = _inputs.read_json(cfg, "train_head", "metrics.json")
    head_val = head_metrics["val_accuracy"]
    train, val = (_images(cfg, frame, split) for split in ("train", "val"))
    inputs = {
        "n_train": len(train.paths),
        "min_train_images": p.min_train_images,
        "domain_verdict": verdict,
        "require_shifted": p.require_shifted,
        "enabled": p.enabled,
    }
    closed = gate(p, len(train.paths), verdict, head_metrics.get("refit_on_train_val", False))
    if closed:
        decision = {
            "finetuned": False,
            "reason": closed,
            "gate_open": False,
            "val_accuracy_head_only": head_val,
            "val_accuracy_finetuned": None,
        }
        tuned = Tuned(decision, [], head_file.read_bytes())
    elif not val.paths:
        raise HeadstartError("finetune needs a validation split to decide; raise prepare.val_fraction")
    else:
        epochs = head_metrics["epochs_run"]  # one step axis
        live = curve_logger(cfg, "finetune", offset=epochs)
        th = chosen_params(cfg.train_head, head_metrics)[0]  # the class balance the search chose
        tuned = tune(head_file, train, val, p, th, cfg.project.seed, cfg.project.cache_dir, live)
    d = {**tuned.decision, "gate": inputs}
    with directory(cfg.stage_dir("finetune")) as out:
        write_bytes(out / "model.pt", tuned.model)
        write_json(out / "decision.json", d)
        write_json(out / "history.json", tuned.history)
        write_text(out / "summary.md", to_markdown(d))
    return FinetuneResult(
        d["finetuned"], d["reason"], d["val_accuracy_head_only"], d["val_accuracy_finetuned"]
    )


def _images(cfg: Params, frame, split: str) -> Images:
    rows, paths = _inputs.split_paths(cfg, frame, split)
    return Images(paths, list(rows["sha256"]), list(rows["label"]))
