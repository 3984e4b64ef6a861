"""Selection between the transfer and the from-scratch model, the scratch gate, and the transfer gain."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.config import MinPerSplit, ScratchParams
from headstart.scratch import gate, too_small, why_run
from headstart.selection import (
    choose,
    gain_line,
    scratch_candidate,
    to_markdown,
    transfer_candidate,
    transfer_gain,
    val_images,
    val_line,
    with_interval,
)


def _c(name: str, acc: float, loss: float) -> dict:
    kind = "scratch" if name == "scratch" else "head"
    return {"name": name, "kind": kind, "val_accuracy": acc, "val_loss": loss, "wall_s": 1.0}


def test_a_tie_within_the_margin_goes_to_transfer():
    chosen, reason = choose(_c("transfer", 0.90, 0.40), _c("scratch", 0.905, 0.10), margin=0.01)
    assert chosen["name"] == "transfer" and "transfer kept" in reason and "+0.0050" in reason
    chosen, _ = choose(_c("transfer", 0.90, 0.30), _c("scratch", 0.90, 0.30), margin=0.0)  # a full tie
    assert chosen["name"] == "transfer"


def test_a_clearly_better_scratch_model_wins():
    chosen, reason = choose(_c("transfer", 0.70, 0.60), _c("scratch", 0.95, 0.20), margin=0.01)
    assert chosen["name"] == "scratch" and reason.startswith("scratch wins") and "+0.2500" in reason


def test_a_worse_scratch_model_loses():
    chosen, reason = choose(_c("transfer", 0.95, 0.20), _c("scratch", 0.70, 0.10), margin=0.0)
    assert chosen["name"] == "transfer" and "-0.2500" in reason


def test_at_the_margin_the_lower_loss_decides():
    t, s = _c("transfer", 0.90, 0.40), _c("scratch", 0.90, 0.30)
    assert choose(t, s, margin=0.0)[0]["name"] == "scratch"
    assert choose(t, {**s, "val_loss": 0.5}, margin=0.0)[0]["name"] == "transfer"


def test_without_a_scratch_model_transfer_is_the_only_candidate():
    chosen, reason = choose(_c("transfer", 0.5, 1.0), None, margin=0.01)
    assert chosen["name"] == "transfer" and "only candidate" in reason


def test_candidates_from_the_stage_reports():
    head = {"val_accuracy": 0.8, "val_loss": 0.5, "wall_s": 10.0}
    closed = {"finetuned": False, "gate_open": False}
    assert transfer_candidate(head, closed) == {
        "name": "transfer", "kind": "head", "val_accuracy": 0.8, "val_loss": 0.5, "wall_s": 10.0,
    }  # fmt: skip
    kept = {"finetuned": True, "val_accuracy_finetuned": 0.9, "val_loss_finetuned": 0.3, "wall_s": 5.0}
    t = transfer_candidate(head, kept)
    assert (t["kind"], t["val_accuracy"], t["val_loss"], t["wall_s"]) == ("finetuned", 0.9, 0.3, 15.0)
    assert scratch_candidate({"ran": False, "reason": "x"}) is None
    ran = {"ran": True, "val_accuracy": 0.7, "val_loss": 0.9, "wall_s": 3.0, "parameters": 271954}
    assert scratch_candidate(ran)["kind"] == "scratch"


def test_each_candidate_carries_its_val_accuracy_interval():
    head = {"val_accuracy": 34 / 41, "val_loss": 0.5, "wall_s": 1.0, "n_val": 41}
    t = with_interval(transfer_candidate(head, {"finetuned": False}), val_images(head, "head"), 2000, 0.95, 0)
    low, high = t["val_accuracy_ci"]
    assert t["n_val"] == 41 and low < t["val_accuracy"] < high and 0.09 < (high - low) / 2 < 0.14
    assert val_line(t) == f"val accuracy 0.8293 (95% CI {low:.4f}-{high:.4f}) on 41 images"
    # a cross-validated figure counts every train+val image: a narrower interval
    cv = {**head, "val_accuracy_n": 410}
    assert val_images(cv, "head") == 410 and val_images(cv, "finetuned") == val_images(cv, "scratch") == 41
    narrow = with_interval(transfer_candidate(cv, {"finetuned": False}), 410, 2000, 0.95, 0)
    assert narrow["val_accuracy_ci"][1] - narrow["val_accuracy_ci"][0] < high - low
    d = {"chosen": "transfer", "kind": "head", "reason": "r", "candidates": [t], "scratch_reason": ""}
    assert f"| 95%: {low:.4f}-{high:.4f} | 41 |" in to_markdown(d)


@pytest.mark.parametrize(
    ("run", "n", "verdict", "on_mismatch", "trains"),
    [
        ("never", 10**6, "mismatch", "scratch", False),
        ("always", 3, "in_domain", "warn", True),
        ("auto", 3, "mismatch", "scratch", True),
        ("auto", 3, "mismatch", "warn", False),  # warn/continue: transfer alone, as before
        ("auto", 3, "in_domain", "scratch", False),
        ("auto", 1000, "in_domain", "scratch", True),  # the large-data case
    ],
)
def test_the_gate_modes(run, n, verdict, on_mismatch, trains):
    p = ScratchParams(run=run, min_train_images=1000)
    closed = gate(p, n, verdict, on_mismatch)
    assert (closed is None) == trains
    if trains:
        assert why_run(p, n, verdict)
    else:
        assert "scratch" in closed


def test_splits_too_small_for_a_scratch_model_keep_transfer():
    need = MinPerSplit(train=5, val=1)
    assert too_small({"a": 5, "b": 6}, {"a": 1, "b": 2}, need) is None
    why = too_small({"a": 5, "b": 6}, {"a": 1}, need)
    assert "class 'b' has 6 training and 0 validation images" in why and "transfer is kept" in why
    assert "class 'a'" in too_small({"a": 1, "b": 6}, {"a": 1, "b": 1}, MinPerSplit(train=0, val=0))


def test_the_transfer_gain_is_promotions_paired_statistics():
    y = np.array(["a", "b"] * 20)
    transfer = y.copy()
    scratch = np.where(np.arange(40) < 10, np.where(y == "a", "b", "a"), y)  # 10 wrong
    g = transfer_gain(y, transfer, scratch, 500, 0.95, seed=0)
    assert g["measured"] and g["difference"] == pytest.approx(0.25) and g["n_images"] == 40
    assert 0 < g["ci_low"] <= 0.25 <= g["ci_high"] and g["mcnemar"]["only_new_right"] == 10
    assert g["mcnemar"]["p_value"] < 0.01
    g |= {
        "transfer": {"kind": "head", "test_accuracy": 1.0, "wall_s": 12.0, "parameters": 3_600_000},
        "scratch": {"kind": "scratch", "test_accuracy": 0.75, "wall_s": 41.0, "parameters": 272_474},
    }
    line = gain_line(g)
    assert line.startswith("+0.25 (95% CI [") and "head 1.00 vs scratch 0.75" in line
    assert "scratch 41 s, 272k params" in line and "3.6M params" in line
    assert gain_line({"measured": False, "why_not": "no from-scratch model"}) == (
        "not measured: no from-scratch model"
    )
