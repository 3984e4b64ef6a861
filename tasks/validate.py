"""validate: the Great Expectations suite over the manifest; quarantine; the gate before training."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.atomic import FAILED, directory, write_json, write_text
from headstart.config import Params
from headstart.validation import ValidationFailed, failure_message, to_markdown, validate_manifest
from tasks import _inputs


@dataclass
class ValidateResult:
    success: bool
    n_images: int
    n_quarantined: int
    failed: list[str]
    warnings: list[str]


def validate(cfg: Params) -> ValidateResult:
    manifest = _inputs.prepared_manifest(cfg)
    final = cfg.stage_dir("validate")
    with directory(final) as out:
        v = validate_manifest(manifest, cfg.validate, out / "data_docs")
        v.clean.to_parquet(out / "manifest.parquet", index=False)
        v.quarantine.to_csv(out / "quarantine.csv", index=False)
        write_json(out / "report.json", v.report)
        write_text(out / "summary.md", to_markdown(v.report))
        _print_quarantine(
            cfg, v.quarantine, final / ("" if v.report["success"] else FAILED) / "quarantine.csv"
        )
        if not v.report["success"]:  # the gate: training never sees failed data, the last good stays
            raise ValidationFailed(failure_message(v.report, final / FAILED / "report.json"))
    r = v.report
    return ValidateResult(True, r["n_images"], r["n_quarantined"], r["failed"], r["warnings"])


SHOWN = 20  # quarantined files named on the console; quarantine.csv lists them all


def _print_quarantine(cfg: Params, quarantine, csv) -> None:
    for row in quarantine.head(SHOWN).itertuples():
        print(f"quarantined {cfg.prepare.data_dir / row.path}: {row.reason}")
    if len(quarantine) > SHOWN:
        more = len(quarantine) - SHOWN
        print(f"... and {more} more quarantined ({len(quarantine)} in all); every file and reason: {csv}")
