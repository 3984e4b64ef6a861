"""The head's settings chosen by evidence: an Optuna search scored by cross-validation on cached features.

Features are cached, so a head costs a fraction of a second to train: affordable enough to search its
settings on every run. Small data (train+val under `train_head.search.cv_max_images`): stratified
k-fold cross-validation over train+val, then one refit on both for the epochs the folds' early
stopping chose. Large data: the same search scored on the validation split. The test split never
enters. The settings as given (params.yaml) are the first trial, so the search never picks settings
that cross-validate worse than the defaults; a tie keeps the earlier trial.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from headstart.config import MAX_EPOCHS, SearchParams, TrainHeadParams
from headstart.training import fit_head, fit_heads, stratified_folds

# The space searched: wide enough for a linear probe and a wide MLP, narrow enough for ~20 trials.
HIDDEN = (0, 128, 256, 512)  # 0: a linear head
LR = (3e-4, 3e-2)  # log-uniform; below, AdamW needs hundreds of epochs to fit a head: the cost, no gain
WEIGHT_DECAY = (1e-6, 1e-1)  # log-uniform
DROPOUT = (0.0, 0.5)
CLASS_BALANCE = ("weighted", "sampler", "none")
LOSS_TIE_BREAK = 1e-3  # score = accuracy - this * loss: on few images many trials tie on accuracy


@dataclass(frozen=True)
class Folds:
    """Where each row (train rows, then val rows) is held out: its fold, or -1 when never held out."""

    which: np.ndarray
    k: int
    mode: str  # "cv": k folds over train+val, then a refit on both; "holdout": the validation split
    note: str | None = None  # why the plan differs from the params (fewer folds, holdout)

    def describe(self) -> str:
        n = len(self.which)
        if self.mode == "cv":
            return f"{self.k}-fold cross-validation over {n} train+val images"
        return f"the validation split ({int((self.which == 0).sum())} of {n} train+val images)"


def plan_folds(y_train: np.ndarray, y_val: np.ndarray, sp: SearchParams, seed: int) -> Folds:
    """k-fold over train+val when it is small, else the validation split; fewer folds when a class has
    fewer images than folds (never fewer than 2), the validation split when a class has only one."""
    y = np.concatenate([y_train, y_val])
    holdout = np.concatenate([np.full(len(y_train), -1), np.zeros(len(y_val), np.int64)])
    if len(y) >= sp.cv_max_images:
        note = f"{len(y)} train+val images >= train_head.search.cv_max_images={sp.cv_max_images}"
        return Folds(holdout, 1, "holdout", note)
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        note = "a class has 1 train+val image: too few to cross-validate; searched on the validation split"
        return Folds(holdout, 1, "holdout", note)
    k = min(sp.folds, smallest)
    note = None
    if k < sp.folds:
        note = f"the smallest class has {smallest} train+val images: {k} folds instead of {sp.folds}"
    return Folds(stratified_folds(y, k, seed), k, "cv", note)


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    folds: Folds,
    num_classes: int,
    p: TrainHeadParams,
    seed: int,
    views: np.ndarray | None = None,
    after_fold=None,
) -> dict:
    """A head per fold with settings `p`, early-stopped on the held-out fold: the held-out accuracy
    and loss at each fold's best epoch, their mean and spread, and the median best epoch (the refit's
    length). `views` (n, K, F) augment the fold's training rows; `after_fold(k, mean so far)` may
    stop early (Optuna's pruning: the folds not yet started are not run)."""
    accs, losses, epochs = [], [], []

    def done(k: int, result: tuple) -> None:
        _, history, best = result
        accs.append(history[best - 1]["val_accuracy"])
        losses.append(history[best - 1]["val_loss"])
        epochs.append(best)
        if after_fold is not None:
            after_fold(k, float(np.mean(accs)))

    fits = []
    for k in range(folds.k):
        held = folds.which == k
        fits.append(dict(x_train=x[~held], y_train=y[~held], x_val=x[held], y_val=y[held], seed=seed + k))
        fits[-1]["views"] = None if views is None else views[~held]
    fit_heads(fits, num_classes, p, on_done=done)  # the folds side by side, one per core
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "fold_accuracies": [round(a, 6) for a in accs],
        "loss": float(np.mean(losses)),
        "epochs": int(np.median(epochs)),
    }


@dataclass
class Search:
    params: TrainHeadParams  # the chosen settings (train_head's, with the searched keys replaced)
    folds: Folds
    estimate: dict | None  # cross_validate of the chosen settings; None when the search was off
    trials: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def refit(self) -> bool:
        """Whether the final head trains on train+val (cv) rather than early-stopping on val."""
        return self.estimate is not None and self.folds.mode == "cv"

    def final_params(self) -> TrainHeadParams:
        """The refit trains for the folds' median best epoch, with no early stopping (no held-out
        rows are left to stop on)."""
        if not self.refit:
            return self.params
        return self.params.model_copy(
            update={"max_epochs": max(1, self.estimate["epochs"]), "patience": MAX_EPOCHS}
        )

    def held_out(self, best: dict, n_train: int, n_val: int) -> dict:
        """The head's held-out figures for metrics.json (what select weighs) and how the search chose:
        after a refit the cross-validated estimate over train+val (the refit saw val), else the
        final fit's best epoch on the val split (`best`: its history row)."""
        chosen, e = self.final_params(), self.estimate
        return {
            "val_loss": e["loss"] if self.refit else best["val_loss"],
            "val_accuracy": e["accuracy"] if self.refit else best["val_accuracy"],
            "val_estimate": "cross-validated" if self.refit else "validation split",
            "val_accuracy_n": n_train + n_val if self.refit else n_val,  # the images it counts
            "refit_on_train_val": self.refit,
            "cv_accuracy": e["accuracy"] if e else None,
            "cv_accuracy_std": e["accuracy_std"] if e else None,
            "search_trials": len(self.trials),
            "search_wall_s": round(self.wall_s, 2),
            "settings": {k: getattr(chosen, k) for k in SEARCHED},
        }

    def line(self) -> str:
        """The run summary's account of how the head's settings were chosen."""
        p = self.params
        notes = "".join(f"; {n}" for n in self.notes)
        if self.estimate is None:
            return f"settings as given (search off){notes}"
        head = "linear head" if p.hidden == 0 else f"hidden {p.hidden}"
        views = f", {p.augment_views} augmented views" if p.augment_views else ""
        e, how = self.estimate, "refit on train+val for" if self.refit else "early-stopped on val at"
        return (
            f"searched {len(self.trials)} trials on {self.folds.describe()}: {head}, lr {p.lr:.1e}, "
            f"weight decay {p.weight_decay:.1e}, dropout {p.dropout:.2f}, class balance {p.class_balance}"
            f"{views}; CV accuracy {e['accuracy']:.4f} +- {e['accuracy_std']:.4f} over {self.folds.k} "
            f"fold(s), {how} {e['epochs']} epochs; {self.wall_s:.1f} s{notes}"
        )

    def to_json(self) -> dict:
        p = self.params
        return {
            "searched": self.estimate is not None,
            "mode": self.folds.mode if self.estimate is not None else "off",
            "scored_on": self.folds.describe(),
            "folds": self.folds.k,
            "chosen": {k: getattr(p, k) for k in SEARCHED},
            "estimate": self.estimate,
            "refit_epochs": self.final_params().max_epochs if self.refit else None,
            "notes": self.notes,
            "line": self.line(),
            "n_trials": len(self.trials),
            "n_pruned": sum(t["state"] == "PRUNED" for t in self.trials),
            "wall_s": round(self.wall_s, 2),
            "trials": self.trials,
        }


SEARCHED = ("hidden", "dropout", "lr", "weight_decay", "class_balance", "augment_views")


def search_head(
    x: np.ndarray,
    y: np.ndarray,
    folds: Folds,
    num_classes: int,
    p: TrainHeadParams,
    seed: int,
    views: np.ndarray | None = None,
) -> Search:
    """Optuna's TPE (seeded) over SEARCHED, each trial scored by `cross_validate`; the median pruner
    stops a trial whose running fold mean trails the others'. Same inputs and seed, same choice,
    unless the time cap stopped it (then the note says the choice depends on the machine's speed)."""
    import optuna

    sp, notes = p.search, [folds.note] if folds.note else []
    if sp.trials == 0:
        notes.append(
            "train_head.search.trials is 0: the settings in params.yaml, early-stopped on the val split"
        )
        return Search(p, folds, None, notes=notes)
    optuna.logging.set_verbosity(logging.WARNING)
    k_views = 0 if views is None else views.shape[1]
    start = time.perf_counter()
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(8, max(1, sp.trials // 2))),
        # from the 5th trial on, one whose running fold mean trails the median stops after any fold
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0),
    )
    first = {k: getattr(p, k) for k in SEARCHED if k != "augment_views"}
    study.enqueue_trial(first | ({"views": p.augment_views > 0} if k_views else {}))

    def objective(trial) -> float:
        settings = {
            "hidden": trial.suggest_categorical(
                "hidden", HIDDEN if p.hidden in HIDDEN else (*HIDDEN, p.hidden)
            ),
            "dropout": trial.suggest_float("dropout", *DROPOUT),
            "lr": trial.suggest_float("lr", *LR, log=True),
            "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY, log=True),
            "class_balance": trial.suggest_categorical("class_balance", CLASS_BALANCE),
        }
        use_views = trial.suggest_categorical("views", (False, True)) if k_views else False
        settings["augment_views"] = k_views if use_views else 0
        trial_p = p.model_copy(update=settings)
        trial.set_user_attr("settings", settings)

        def after_fold(k: int, mean: float) -> None:
            trial.report(mean, k)
            if trial.should_prune():
                raise optuna.TrialPruned()

        t0 = time.perf_counter()
        est = cross_validate(
            x, y, folds, num_classes, trial_p, seed, views=views if use_views else None, after_fold=after_fold
        )
        trial.set_user_attr("estimate", est)
        trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 3))
        return est["accuracy"] - LOSS_TIE_BREAK * est["loss"]

    study.optimize(objective, n_trials=sp.trials, timeout=sp.timeout_s, catch=())
    trials = [_trial_row(t) for t in study.trials]
    if len(study.trials) < sp.trials:
        notes.append(
            f"stopped by train_head.search.timeout_s={sp.timeout_s:g} after {len(study.trials)} of "
            f"{sp.trials} trials: this choice depends on the machine's speed"
        )
    best = study.best_trial
    chosen = p.model_copy(update=best.user_attrs["settings"])
    return Search(chosen, folds, best.user_attrs["estimate"], trials, notes, time.perf_counter() - start)


def chosen_params(p: TrainHeadParams, head_metrics: dict) -> tuple[TrainHeadParams, int]:
    """train_head's params with the settings its search chose (from its metrics.json), and the epochs
    the shipped head trained (its best epoch): how a cross-fitted head reproduces it."""
    return p.model_copy(update=head_metrics.get("settings", {})), head_metrics["best_epoch"]


def _trial_row(t) -> dict:
    est = t.user_attrs.get("estimate") or {}
    return {
        "number": t.number,
        "state": t.state.name,
        **t.user_attrs.get("settings", t.params),
        "cv_accuracy": est.get("accuracy"),
        "cv_accuracy_std": est.get("accuracy_std"),
        "cv_loss": est.get("loss"),
        "epochs": est.get("epochs"),
        "score": t.value if t.state.name == "COMPLETE" else None,
        "wall_s": t.user_attrs.get("wall_s"),
    }


def train_best_head(
    xt: np.ndarray,
    yt: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    views: np.ndarray | None,
    num_classes: int,
    p: TrainHeadParams,
    seed: int,
    val_views=None,
    on_epoch=None,
) -> tuple:
    """train_head's head from cached features: the search, then the final fit (a refit on train+val
    in CV mode, else early-stopped on val): (head, history, best_epoch, search). `views` (len(yt), K,
    F): the training rows' augmented views; `val_views()` the val rows', called only when val rows
    train (CV folds), as they may cost backbone passes; held-out val rows never train on views."""
    folds = plan_folds(yt, yv, p.search, seed)
    x, y = np.concatenate([xt, xv]), np.concatenate([yt, yv])
    both = None
    if p.augment_views:
        val_trains = folds.mode == "cv" and p.search.trials and val_views is not None
        both = np.concatenate(
            [views, val_views() if val_trains else np.repeat(xv[:, None], p.augment_views, 1)]
        )
    search = search_head(x, y, folds, num_classes, p, seed, views=both)
    chosen = search.final_params()
    n = len(y) if search.refit else len(yt)
    x_val, y_val = (xv[:0], yv[:0]) if search.refit else (xv, yv)
    views_fit = both[:n] if chosen.augment_views else None
    head, history, best = fit_head(
        x[:n], y[:n], x_val, y_val, num_classes, chosen, seed, views=views_fit, on_epoch=on_epoch
    )
    return head, history, best, search
