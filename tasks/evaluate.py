"""evaluate: test-set metrics of the trained model, a confusion matrix (PNG and DVC plot data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from headstart import HeadstartError
from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.config import Params
from headstart.features import Features
from headstart.metrics import classification_metrics, confusion_png, metrics_markdown
from headstart.training import load_model
from tasks import _inputs


@dataclass
class EvaluateResult:
    accuracy: float
    macro_f1: float
    n_test: int


def evaluate(cfg: Params) -> EvaluateResult:
    model = load_model(_inputs.stage_file(cfg, "finetune", "model.pt"))
    rows, paths = _inputs.split_paths(cfg, _inputs.manifest(cfg), "test")
    if rows.empty:
        raise HeadstartError("the test split is empty; add images or raise prepare.test_fraction")
    # features of the backbone as trained (pretrained, or with its fine-tuned blocks: another cache
    # key) + the head = the full model's logits
    features = Features(
        model.backbone, cfg.train_head.runtime, cfg.project.cache_dir, cfg.evaluate.batch_size
    )
    x, _ = features(paths, list(rows["sha256"]), desc="features (test)")
    probs = model.probabilities(x)
    y_true = rows["label"].map(model.classes.index).to_numpy()
    y_pred = probs.argmax(1)
    m = classification_metrics(y_true, y_pred, model.classes)
    predictions = pd.DataFrame(
        {
            "path": rows["path"],
            "actual": rows["label"],
            "predicted": [model.classes[i] for i in y_pred],
            "confidence": probs.max(1).round(6),
        }
    )
    with directory(cfg.stage_dir("evaluate")) as out:
        write_json(out / "metrics.json", {k: v for k, v in m.items() if k != "confusion_matrix"})
        write_text(out / "summary.md", metrics_markdown(m, model.classes, model.finetuned))
        write_json(out / "confusion.json", {"classes": model.classes, "matrix": m["confusion_matrix"]})
        write_bytes(
            out / "confusion.png",
            confusion_png(np.array(m["confusion_matrix"]), model.classes, "test confusion matrix"),
        )
        predictions.to_csv(out / "predictions.csv", index=False)
    return EvaluateResult(m["accuracy"], m["macro_f1"], m["n"])
