"""The pipeline's figures, as PNG bytes. matplotlib draws them in a child process (`drawn`, through
headstart.ops.isolate): pyplot (~24 MB imported, more with its font caches) never enters the flow's
process, where it would stay for the rest of the run and sit under export's peak; and pyplot's global
figure state is never shared by two stages running in threads of one process."""

from __future__ import annotations

import io

import numpy as np

SPARE = "headstart.plots"  # the key of the child that prewarm starts: any figure of this module may use it


def drawn(name: str, *args) -> bytes:
    """The figure `name` (a function of this module) drawn from `args` in a fresh process (the one
    `prewarm` started, if any)."""
    from headstart.ops.isolate import call

    return call(f"headstart.plots:{name}", f"the {name} plot", *args, spare=SPARE)


def prewarm() -> None:
    """Start the child the next figure is drawn in, importing pyplot now (~0.7 s on 2 cores) while the
    caller goes on (the flow: as a stage that draws starts). One at a time; unused, it exits with us."""
    from headstart.ops.isolate import prewarm

    prewarm(SPARE, "matplotlib.pyplot", "headstart.plots")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig, dpi: int) -> bytes:
    """The figure laid out, as PNG bytes; the figure is closed (pyplot keeps every open one)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def domain_profile(profile: list[dict], thresholds: dict, title: str, mean=None, std=None) -> bytes:
    """Left: per-layer BN divergence with the calibrated thresholds. Right: the input's per-channel
    mean and std in the backbone's normalised units, where its pretraining data sits at 0 and 1."""
    plt = _pyplot()
    fig, (ax, ch) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    ax.plot([p["divergence"] for p in profile], marker=".", label="these images")
    for name, style in (("shifted_at", "--"), ("mismatch_at", ":")):
        ax.axhline(thresholds[name], color="grey", linestyle=style, label=name)
    ax.set(xlabel="BatchNorm layer (input side -> output side)", ylabel="log(1 + sym. KL)", title=title)
    ax.legend(loc="upper left", fontsize=8)
    if mean is not None and std is not None:
        xs = np.arange(3)
        ch.bar(xs - 0.2, mean, 0.4, label="mean")
        ch.bar(xs + 0.2, std, 0.4, label="std")
        ch.axhline(0, color="grey", linewidth=0.8)
        ch.axhline(1, color="grey", linestyle="--", linewidth=0.8)
        ch.set(xticks=xs, xticklabels=["R", "G", "B"], title="input vs pretraining (0, 1)")
        ch.legend(fontsize=8)
    return _png(plt, fig, 100)


def confusion_matrix(cm: np.ndarray, classes: list[str], title: str) -> bytes:
    """A confusion matrix, counts in the cells (rows: true class, columns: predicted)."""
    plt = _pyplot()
    size = 2.5 + 0.5 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    return _png(plt, fig, 100)


def training_curves(curves: dict[str, list[dict]]) -> bytes:
    """Loss and validation accuracy per epoch; fine-tuning continues the head's epochs."""
    plt = _pyplot()
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 3.2))
    offset = 0
    for name, rows in curves.items():
        start = offset if name == "fine-tuned" else 0
        xs = [start + i + 1 for i in range(len(rows))]
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            if rows and key in rows[0]:
                loss.plot(xs, [r.get(key) for r in rows], style, label=f"{name} {key}")
        if rows and "val_accuracy" in rows[0]:
            acc.plot(xs, [r.get("val_accuracy") for r in rows], label=name)
        offset = len(rows) if name == "head" else offset
    loss.set(xlabel="epoch", title="loss")
    acc.set(xlabel="epoch", title="validation accuracy")
    for ax in (loss, acc):
        ax.legend(fontsize=7)
    return _png(plt, fig, 80)
