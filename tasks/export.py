"""export: ONNX with a dynamic batch and its preprocessing contract; parity with torch on test images."""

from __future__ import annotations

import json
from dataclasses import dataclass

from headstart import HeadstartError
from headstart.atomic import directory, write_json
from headstart.config import Params
from headstart.export import export_onnx, parity
from tasks import _inputs


@dataclass
class ExportResult:
    onnx_path: str
    max_abs_logit_diff: float
    top1_agreement: float
    passed: bool


def export(cfg: Params) -> ExportResult:
    from headstart.training import load_model

    p = cfg.export
    model = load_model(_inputs.stage_file(cfg, "finetune", "model.pt"))
    report = _inputs.read_json(cfg, "prepare", "report.json")
    _, paths = _inputs.split_paths(cfg, _inputs.manifest(cfg), "test")
    final = cfg.stage_dir("export") / "model.onnx"
    with directory(cfg.stage_dir("export")) as out:
        export_onnx(
            model.classifier,
            out / "model.onnx",
            model.backbone.spec,
            {
                "headstart.classes": json.dumps(model.classes),
                "headstart.backbone": model.backbone.name,
                "headstart.backbone_weights_sha256": model.backbone.weights_sha256,
                "headstart.data_hash": report["data_hash"],
            },
            p.opset,
        )
        figures = parity(model.classifier, out / "model.onnx", paths, p.batch_size)
        passed = (
            figures["top1_agreement"] >= p.min_top1_agreement
            and figures["max_abs_logit_diff"] <= p.max_abs_diff
        )
        write_json(
            out / "parity.json",
            {
                **figures,
                "passed": passed,
                "max_abs_diff_allowed": p.max_abs_diff,
                "min_top1_agreement": p.min_top1_agreement,
            },
        )
    if not passed:  # the report stays for inspection; registration never sees a failed export
        raise HeadstartError(
            f"export parity failed: top-1 agreement {figures['top1_agreement']:.4f} "
            f"(min {p.min_top1_agreement}), max abs logit diff "
            f"{figures['max_abs_logit_diff']:.2e} (max {p.max_abs_diff}); see {final.parent}/parity.json"
        )
    return ExportResult(str(final), figures["max_abs_logit_diff"], figures["top1_agreement"], True)
