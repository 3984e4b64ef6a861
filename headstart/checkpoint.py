"""One checkpoint per epoch, from which a killed training run resumes to the same result as an
uninterrupted one: model, optimiser, scheduler, grad scaler, RNG states, trainable flags and
BatchNorm modes, tied to a key that names what the run trains on. Fine-tuning and from-scratch
training both use it."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from headstart.atomic import write_bytes

log = logging.getLogger(__name__)

# what save writes, each needed to resume; `state` is the loop's own bookkeeping
_BLOB = set("key state best_state model optimizer scheduler scaler generator torch_rng".split())
_BLOB |= {"requires_grad", "bn_training"}
_STATE = {"epoch", "history", "best", "best_epoch", "waited"}


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is on disk (tests kill the run here)."""


class EpochCheckpoint:
    """The checkpoint file at `path` for the run named by `key` (derived from the data, params, seed,
    device and code, so a changed input never resumes an old run). `what` names the training in
    warnings; `frozen_bn` marks a run whose BatchNorm layers never train (fine-tuning), so a
    checkpoint with one in training mode is inconsistent; `after_epoch` replaces the module's hook."""

    def __init__(
        self,
        path: Path,
        key: str,
        what: str = "training",
        frozen_bn: bool = False,
        after_epoch: Callable[[int], None] | None = None,
    ):
        self.path, self.key, self.what, self.frozen_bn = Path(path), key, what, frozen_bn
        self.after_epoch = after_epoch

    def save(self, state: dict, model, opt, sched, scaler, gen: torch.Generator) -> None:
        """Write `state` (the loop's bookkeeping: epoch, history, best, best_epoch, waited, best_state)
        with every object training needs to go on, atomically; then run the after-epoch hook."""
        blob = {
            "key": self.key,
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
        write_bytes(self.path, buf.getvalue())
        (self.after_epoch or _after_epoch)(state["epoch"])

    def restore(self, model, opt, sched, scaler, gen: torch.Generator) -> dict | None:
        """The saved state, applied to model, optimiser, scheduler, scaler and RNGs; or None, with a
        warning and the file removed, when it is damaged (a kill mid-write on a file system without
        atomic rename, a full disk) or not this run's: a cache is rebuilt, so training restarts from
        epoch 1, untouched by the bad file, rather than asking the user to delete it."""
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            problem = self._damage(blob, model)
        except Exception as exc:
            problem = f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
        if problem:
            log.warning(
                "%s checkpoint %s is %s; discarded, %s starts from epoch 1",
                self.what,
                self.path,
                problem,
                self.what,
            )
            self.clear()
            return None
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        gen.set_state(blob["generator"])
        torch.set_rng_state(blob["torch_rng"])
        for n, q in model.named_parameters():
            q.requires_grad_(blob["requires_grad"][n])
        for m, training in zip(bn_modules(model), blob["bn_training"], strict=True):
            m.train(training)
        return {**blob["state"], "best_state": blob["best_state"]}

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _damage(self, blob, model: nn.Module) -> str | None:
        """What makes `blob` unusable as this run's checkpoint, checked before anything is applied (a
        half-applied checkpoint would leave a run that is neither resumed nor fresh), or None."""
        if not isinstance(blob, dict) or not _BLOB <= blob.keys() or not _STATE <= set(blob["state"]):
            return "incomplete"
        if blob["key"] != self.key:
            return "of other inputs"
        want = {k: v.shape for k, v in model.state_dict().items()}
        if {k: getattr(v, "shape", None) for k, v in blob["model"].items()} != want:
            return "of another model (tensor names or shapes differ)"
        modes = blob["bn_training"]
        if (
            set(blob["requires_grad"]) != {n for n, _ in model.named_parameters()}
            or len(modes) != len(bn_modules(model))
            or (self.frozen_bn and any(modes))
        ):
            return "inconsistent (trainable flags or BatchNorm mode)"
        return None
