"""Classification metrics and their plots, from labels and predictions (numpy only, plus matplotlib)."""

from __future__ import annotations

import io

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, with the confusion matrix."""
    cm = confusion(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "n": int(cm.sum()),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


def confusion_png(cm: np.ndarray, classes: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


KIND_NAMES = {"head": "head-only", "finetuned": "fine-tuned", "scratch": "from-scratch"}


def metrics_markdown(m: dict, classes: list[str], kind: str) -> str:
    """The test metrics for a Prefect artifact: accuracy, macro-F1, per class, the confusion matrix;
    `kind` is the model's (head, finetuned, scratch)."""
    lines = [
        f"# Test metrics ({KIND_NAMES.get(kind, kind)} model, {m['n']} images)",
        "",
        f"Accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *[
            f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
            for c, v in m["per_class"].items()
        ],
        "",
        "| actual \\ predicted | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
        *[
            f"| {c} | " + " | ".join(map(str, row)) + " |"
            for c, row in zip(classes, m["confusion_matrix"], strict=True)
        ],
    ]
    return "\n".join(lines) + "\n"
