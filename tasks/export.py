"""export: ONNX with a dynamic batch and its preprocessing contract, in fp32 and (optionally) fp16;
each variant must match torch on the real test images at every parity batch size, or registration
never sees it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from headstart import HeadstartError
from headstart.atomic import directory, write_json, write_text
from headstart.config import Params
from headstart.export import export_onnx, parity, torch_reference
from headstart.runtime import EXPORT_FILES
from tasks import _inputs


@dataclass
class ExportResult:
    onnx_path: str
    max_abs_logit_diff: float
    top1_agreement: float
    passed: bool
    variants: list[str]


def export(cfg: Params) -> ExportResult:
    from headstart.training import load_model

    p = cfg.export
    model = load_model(_inputs.stage_file(cfg, "finetune", "model.pt"))
    report = _inputs.read_json(cfg, "prepare", "report.json")
    rows, paths = _inputs.split_paths(cfg, _inputs.manifest(cfg), "test")
    labels = [model.classes.index(c) if c in model.classes else -1 for c in rows["label"]]
    meta = {
        "headstart.classes": json.dumps(model.classes),
        "headstart.backbone": model.backbone.name,
        "headstart.backbone_weights_sha256": model.backbone.weights_sha256,
        "headstart.finetuned": str(model.finetuned).lower(),
        "headstart.data_hash": report["data_hash"],
    }
    variants = {name: EXPORT_FILES[name] for name in ("fp32", "fp16") if name == "fp32" or p.fp16}
    final = cfg.stage_dir("export")
    figures: dict[str, dict] = {}
    reference = torch_reference(model.classifier, paths, model.backbone.spec)  # once for all variants
    with directory(final) as out:
        for name, file in variants.items():
            export_onnx(
                model.classifier, out / file, model.backbone.spec, meta, p.opset, p.input, name == "fp16"
            )
            f = parity(model.classifier, out / file, paths, tuple(p.parity_batch_sizes), labels, reference)
            tol = getattr(p.tolerances, name)
            f["file"] = file
            f["tolerances"] = tol.model_dump()
            f["passed"] = (
                f["max_abs_logit_diff"] <= tol.max_abs_diff
                and f["top1_agreement"] >= tol.min_top1_agreement
                and f["max_metric_diff"] <= tol.max_metric_diff
            )
            figures[name] = f
        fp32 = figures["fp32"]
        passed = all(f["passed"] for f in figures.values())
        write_json(
            out / "parity.json",
            {
                "passed": passed,
                # the fp32 model's figures at the top level: what register logs and the summary prints
                "max_abs_logit_diff": fp32["max_abs_logit_diff"],
                "top1_agreement": fp32["top1_agreement"],
                "n_images": fp32["n_images"],
                "providers": fp32["providers"],
                "variants": figures,
            },
        )
        write_text(out / "summary.md", to_markdown(figures))
    if not passed:  # the report stays for inspection; registration never sees a failed export
        failed = [
            f"{name}: top-1 agreement {f['top1_agreement']:.4f} (min {t['min_top1_agreement']}), "
            f"max abs logit diff {f['max_abs_logit_diff']:.2e} (max {t['max_abs_diff']}), "
            f"test accuracy diff {f['max_metric_diff']:.4f} (max {t['max_metric_diff']})"
            for name, f in figures.items()
            if not f["passed"] and (t := f["tolerances"])
        ]
        raise HeadstartError(f"export parity failed: {'; '.join(failed)}; see {final}/parity.json")
    return ExportResult(
        str(final / variants["fp32"]),
        fp32["max_abs_logit_diff"],
        fp32["top1_agreement"],
        True,
        list(variants),
    )


def to_markdown(figures: dict[str, dict]) -> str:
    lines = [
        "# Export parity (onnxruntime vs torch, real test images)",
        "",
        "| model | batch | max abs logit diff | top-1 agreement | accuracy onnx | accuracy torch |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures.values():
        for bs, v in f["batch_sizes"].items():
            lines.append(
                f"| {f['file']} | {bs} | {v['max_abs_logit_diff']:.2e} | {v['top1_agreement']:.4f} | "
                f"{v.get('accuracy_onnx', float('nan')):.4f} | {f.get('accuracy_torch', float('nan')):.4f} |"
            )
    verdicts = ", ".join(f"{n} {'passed' if f['passed'] else 'FAILED'}" for n, f in figures.items())
    return "\n".join([*lines, "", f"Gate: {verdicts}."]) + "\n"
