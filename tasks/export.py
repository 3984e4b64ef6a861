"""export: ONNX with a dynamic batch and its preprocessing contract, fp32 and the optional variants
(fp16; int8, quantized from the fp32 file and calibrated on training images); each is held to its
parity tolerance against torch on real images. An optional variant that fails drops out (reported,
not registered); a failed fp32 model (or a variant in export.require) stops the run and leaves the
last good export untouched. With calibrate's feature gate, every file computes its score as a second
output, ood_score."""

from __future__ import annotations

import json
from dataclasses import dataclass

from headstart import GateFailed, HeadstartError
from headstart.atomic import FAILED, directory, write_json, write_text
from headstart.calibration import METADATA_KEY, read_gate, read_rule
from headstart.config import Params
from headstart.export import export_variants, parity_images, to_markdown
from headstart.models import load_model
from headstart.quantize import calibration_images
from headstart.runtime import EXPORT_FILES
from tasks import _inputs


@dataclass
class ExportResult:
    onnx_path: str
    max_abs_logit_diff: float
    top1_agreement: float
    passed: bool
    variants: list[str]  # the files that passed their gate: what register logs


def export(cfg: Params) -> ExportResult:
    p, final = cfg.export, cfg.stage_dir("export")
    model = load_model(_inputs.stage_file(cfg, "select", "model.pt"))
    frame = _inputs.manifest(cfg)
    rows = parity_images(frame, p.parity_max_images)
    calibration = [
        cfg.prepare.data_dir / x for x in calibration_images(frame, p.int8_calibration_images)["path"]
    ]
    paths = [cfg.prepare.data_dir / x for x in rows["path"]]
    labels = [
        model.classes.index(c) if s == "test" and c in model.classes else -1
        for c, s in zip(rows["label"], rows["split"], strict=True)
    ]
    rule = read_rule(_inputs.stage_file(cfg, "calibrate", "abstention.json"))
    gate = read_gate(_inputs.stage_file(cfg, "calibrate", "ood_gate.npz")) if rule.ood else None
    if rule.ood and (gate is None or gate.k != rule.ood["k"]):
        raise HeadstartError(
            "calibrate's ood_gate.npz does not match its abstention.json; run calibrate again"
        )
    meta = {
        "headstart.classes": json.dumps(model.classes),
        **model.metadata(),  # transfer: backbone and weights; scratch: architecture and size
        "headstart.data_hash": _inputs.read_json(cfg, "prepare", "report.json")["data_hash"],
        METADATA_KEY: rule.to_json(),  # every variant answers with the same rule
    }
    with directory(final) as out:
        # gate: output ood_score; calibration: int8's sample of training images; the cache: the graft's
        # backbone graph and torch's features of the parity images
        figures = export_variants(
            model, out, meta, paths, labels, p, gate, calibration, cfg.project.cache_dir, list(rows["sha256"])
        )
        passed = [n for n, f in figures.items() if f["passed"]]
        refused = [
            f"{n}: {'; '.join(f['failures'])}"
            for n, f in figures.items()
            if f["required"] and not f["passed"]
        ]
        write_json(
            out / "parity.json",
            {"passed": not refused, **_top(figures["fp32"]), "registered": passed, "variants": figures},
        )
        write_text(out / "summary.md", to_markdown(figures))
        if refused:
            raise GateFailed(
                f"export parity failed: {' | '.join(refused)}; the last good export is kept; "
                f"see {final / FAILED / 'parity.json'}"
            )
    fp32 = figures["fp32"]
    return ExportResult(
        str(final / EXPORT_FILES["fp32"]), fp32["max_abs_logit_diff"], fp32["top1_agreement"], True, passed
    )


def _top(fp32: dict) -> dict:
    """The fp32 model's figures at the top level: what register logs and the summary prints."""
    return {k: fp32[k] for k in ("max_abs_logit_diff", "top1_agreement", "n_images", "providers", "build")}
