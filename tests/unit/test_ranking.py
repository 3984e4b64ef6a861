"""The backbone decision's rule: CV accuracy on small data with LogME breaking ties, LogME alone
otherwise, skipped candidates never chosen, the default when none is left."""

from __future__ import annotations

from headstart.ranking import decide


def _c(name, logme, cv=None):
    return {"name": name, "logme": logme, "cv_accuracy": cv, "cv_accuracy_std": 0.01}


def test_small_data_ranks_by_cv_accuracy_and_logme_breaks_ties():
    a, b, c = _c("a", 0.9, 0.80), _c("b", 0.5, 0.85), _c("c", 0.7, 0.85)
    name, how, why = decide([a, b, c], small=True, default="d")
    assert (name, how) == ("c", "cv_accuracy") and "tied with 1 other(s), LogME decides" in why
    assert decide([a, b], small=True, default="d")[0] == "b"  # accuracy over LogME


def test_larger_data_ranks_by_logme():
    name, how, why = decide([_c("a", 0.2), _c("b", 0.4)], small=False, default="d")
    assert (name, how) == ("b", "logme") and "highest LogME 0.400" in why and "a 0.200" in why


def test_skipped_candidates_are_never_chosen_and_none_left_is_the_default():
    skipped = {"name": "x", "skipped": "weights file /w does not exist"}
    assert decide([skipped, _c("a", -1.0, 0.5)], small=True, default="d")[0] == "a"
    name, how, why = decide([skipped], small=True, default="d")
    assert (name, how) == ("d", "fallback") and "x: weights file /w does not exist" in why
