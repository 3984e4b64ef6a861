"""domain: are the training images close enough to the backbone's pretraining data to transfer?"""

from __future__ import annotations

from dataclasses import dataclass

from headstart import GateFailed
from headstart.atomic import FAILED, directory, write_bytes, write_json, write_text
from headstart.config import Params
from headstart.domain import (
    Probe,
    analyse,
    build_report,
    furthest,
    input_summary,
    reference,
    to_markdown,
)
from headstart.features import Features
from headstart.plots import drawn
from tasks import _backbone, _inputs


class DomainMismatch(GateFailed):
    """The verdict is `mismatch` and domain.on_mismatch is `fail`."""


@dataclass
class DomainResult:
    verdict: str
    score: float | None
    n_images: int


def domain(cfg: Params) -> DomainResult:
    p, th = cfg.domain, cfg.train_head
    train, _ = _inputs.split_paths(cfg, _inputs.manifest(cfg), "train")
    rows = train.sort_values("sha256").head(p.max_images)  # the same sample every run
    paths = [cfg.prepare.data_dir / x for x in rows["path"]]
    backbone = _backbone.load(cfg)  # the chosen one: the domain check runs for it
    # the features runtime and cache of train_head: this pass's features are its features
    features = Features(backbone, th.runtime, cfg.project.cache_dir, p.batch_size)
    probe = Probe(backbone)  # built where needed: a warm onnxruntime pass reads its layers from the cache
    batches = features.probe(probe, paths, list(rows["sha256"]))  # gives probe.layers, before analyse asks
    signals = analyse(batches, probe.layers)
    signals.update(input_summary(rows, backbone.spec.size, backbone.spec.resize_to))
    ref = reference(backbone.name)
    report = build_report(signals, ref, backbone.name, features.runtime, features.shared, p.on_mismatch)
    report["furthest"] = furthest(signals["per_image"], list(rows["path"]))  # shown in the run report
    found = report["verdict"]
    final = cfg.stage_dir("domain")
    with directory(final) as out:
        write_json(out / "report.json", report)
        write_text(out / "summary.md", to_markdown(report))
        if signals["profile"]:
            write_bytes(
                out / "profile.png",
                drawn(
                    "domain_profile",
                    signals["profile"],
                    report["thresholds"],
                    f"{backbone.name}: {found}",
                    signals["input_mean"],
                    signals["input_std"],
                ),
            )
        if found == "mismatch" and p.on_mismatch == "fail":
            raise DomainMismatch(
                f"domain check: the training images are far from {backbone.name}'s pretraining data "
                f"(score {report['score']} >= mismatch threshold {report['thresholds']['mismatch_at']}); "
                f"transfer learning is unlikely to help: rerun with --set domain.on_mismatch=scratch (the "
                f"default: a from-scratch model competes with transfer) or choose another backbone, "
                f"or --set domain.on_mismatch=warn to go on with transfer alone; "
                f"see {final / FAILED / 'report.json'}"
            )
    return DomainResult(found, report["score"], signals["n_images"])
