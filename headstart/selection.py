"""Which model goes on to evaluate, export and register: the transfer model (the head alone, or the
fine-tuned one finetune kept) or the from-scratch model, on validation evidence. Transfer is cheaper
and needs no new architecture, so it keeps a tie: the scratch model must beat its validation accuracy
by more than `select.margin` (at exactly the margin, the lower validation loss decides; a full tie
is transfer's). Evaluate then measures what transfer gained on the test images (transfer_gain)."""

from __future__ import annotations

import numpy as np

from headstart.metrics import ci_text, counted, interval_fields
from headstart.promotion import mcnemar, paired_bootstrap

_EPS = 1e-9  # validation accuracies are ratios of small counts: equal within rounding is equal


def transfer_candidate(head_metrics: dict, finetune: dict) -> dict:
    """The transfer candidate's validation figures and training time from train_head's metrics and
    finetune's decision: the fine-tuned model's when finetune kept it, else the head alone's."""
    wall = (head_metrics.get("wall_s") or 0.0) + (finetune.get("wall_s") or 0.0)
    if finetune["finetuned"]:
        acc, loss, kind = finetune["val_accuracy_finetuned"], finetune["val_loss_finetuned"], "finetuned"
    else:
        acc, loss, kind = head_metrics["val_accuracy"], head_metrics["val_loss"], "head"
    return {"name": "transfer", "kind": kind, "val_accuracy": acc, "val_loss": loss, "wall_s": round(wall, 2)}


def scratch_candidate(decision: dict) -> dict | None:
    """The scratch candidate from the scratch stage's decision, or None when it did not train."""
    if not decision["ran"]:
        return None
    keys = ("val_accuracy", "val_loss", "wall_s", "parameters")
    return {"name": "scratch", "kind": "scratch", **{k: decision[k] for k in keys}}


def val_images(head_metrics: dict, kind: str) -> int:
    """How many images a candidate's val accuracy counts: the validation split's (train_head's n_val),
    or for the head alone `val_accuracy_n` where train_head's figure is an estimate over other images
    (cross-validation over train+val)."""
    n_val = head_metrics["n_val"]
    return head_metrics.get("val_accuracy_n", n_val) if kind == "head" else n_val


def with_interval(candidate: dict, n_images: int, n: int, confidence: float, seed: int) -> dict:
    """The candidate with its val accuracy's bootstrap CI over the n_images it was measured on."""
    hits = counted(round(candidate["val_accuracy"] * n_images), n_images)
    return {**candidate, "n_val": n_images, **interval_fields("val_accuracy", hits, n, confidence, seed)}


def val_line(c: dict) -> str:
    """`val accuracy 0.8293 (95% CI 0.7073-0.9268) on 41 images`, for summaries."""
    ci = ci_text(c.get("val_accuracy_ci"), c.get("ci_confidence", 0.95))
    return f"val accuracy {c['val_accuracy']:.4f}{ci} on {c.get('n_val', '?')} images"


def choose(transfer: dict, scratch: dict | None, margin: float) -> tuple[dict, str]:
    """(the chosen candidate, why): by validation accuracy, transfer credited `margin`, then loss."""
    if scratch is None:
        return (
            transfer,
            f"the only candidate: transfer ({transfer['kind']}); no from-scratch model was trained",
        )
    gain = scratch["val_accuracy"] - transfer["val_accuracy"]
    figures = (
        f"val accuracy scratch {scratch['val_accuracy']:.4f} vs transfer ({transfer['kind']}) "
        f"{transfer['val_accuracy']:.4f} ({gain:+.4f}; select.margin={margin})"
    )
    if gain > margin + _EPS:
        return scratch, f"scratch wins: {figures}"
    if gain >= margin - _EPS and scratch["val_loss"] < transfer["val_loss"]:
        return scratch, (
            f"scratch wins on loss at the margin: {figures}; val loss {scratch['val_loss']:.4f} "
            f"< {transfer['val_loss']:.4f}"
        )
    return transfer, f"transfer kept: {figures}; scratch must beat it by more than the margin"


def gain_on_test(
    y: np.ndarray, models: dict, probabilities: dict, candidates: dict, n: int, confidence: float, seed: int
) -> dict:
    """Both candidates on the same test images (`models` and `probabilities` by name, "transfer" and
    "scratch"; `candidates`: select's figures, for the wall times): each one's test accuracy, size and
    training time, and transfer's gain over scratch (transfer_gain)."""
    out, preds = {"measured": True}, {}
    for name, model in models.items():
        preds[name] = np.array([model.classes[i] for i in probabilities[name].argmax(1)])
        accuracy = float((preds[name] == y).mean())
        out[name] = {"kind": model.kind, "test_accuracy": accuracy, "parameters": model.parameters()}
        out[name]["wall_s"] = candidates[name]["wall_s"]
    return out | transfer_gain(y, preds["transfer"], preds["scratch"], n, confidence, seed)


def transfer_gain(
    y: np.ndarray, pred_transfer: np.ndarray, pred_scratch: np.ndarray, n: int, confidence: float, seed: int
) -> dict:
    """Test accuracy of transfer minus scratch on the same images: promotion's paired bootstrap CI
    and McNemar's test (new = transfer, old = scratch)."""
    boot = paired_bootstrap(y, pred_transfer, pred_scratch, n, confidence, seed)
    keep = ("difference", "ci_low", "ci_high", "confidence", "n_bootstrap", "n_images")
    return {
        "measured": True,
        **{k: boot[k] for k in keep},
        "mcnemar": mcnemar(y, pred_transfer, pred_scratch),
    }


def gain_line(gain: dict | None) -> str:
    """One line for summaries: `+0.12 (95% CI [..]) head 0.95 vs scratch 0.83; ...` or why not."""
    if not gain or not gain.get("measured"):
        return f"not measured: {(gain or {}).get('why_not', 'no report')}"
    t, s = gain["transfer"], gain["scratch"]
    return (
        f"{gain['difference']:+.2f} ({gain['confidence']:.0%} CI "
        f"[{gain['ci_low']:+.2f}, {gain['ci_high']:+.2f}], "
        f"McNemar p={gain['mcnemar']['p_value']:.3g}) {t['kind']} {t['test_accuracy']:.2f} vs scratch "
        f"{s['test_accuracy']:.2f}; {t['kind']} {t['wall_s']:.0f} s, {_k(t['parameters'])} params; "
        f"scratch {s['wall_s']:.0f} s, {_k(s['parameters'])} params"
    )


def _k(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _ci_cell(c: dict) -> str:
    ci = c.get("val_accuracy_ci")
    return f"{c['ci_confidence']:.0%}: {ci[0]:.4f}-{ci[1]:.4f}" if ci else ""


def to_markdown(d: dict) -> str:
    """The selection decision: every candidate's validation figures and the reason."""
    lines = [
        f"# Selection: {d['chosen']} ({d['kind']})",
        "",
        d["reason"],
        "",
        "| candidate | kind | val accuracy | CI | val images | val loss | training wall time (s) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {c['name']} | {c['kind']} | {c['val_accuracy']:.4f} | {_ci_cell(c)} | {c.get('n_val', '')} "
            f"| {c['val_loss']:.4f} | {c['wall_s']} |"
            for c in d["candidates"]
        ],
    ]
    if d.get("scratch_reason"):
        lines += ["", f"From scratch: {d['scratch_reason']}"]
    return "\n".join(lines) + "\n"
