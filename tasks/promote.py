"""promote: the newly registered version becomes `champion` only on evidence (headstart.promotion):
gates, then paired comparisons with `champion` and `best` on the current images none of them trained
or validated on, through onnxruntime. The aliases move last (Registry.move_aliases)."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.atomic import directory, write_json, write_text
from headstart.config import Params
from headstart.promotion import becomes_best, decide, evidence, gates, to_markdown, version_tags
from tasks import _inputs


@dataclass
class PromoteResult:
    promoted: bool
    model_name: str
    version: str
    champion: str | None
    reason: str


def promote(cfg: Params, version: str | None = None, model_name: str | None = None) -> PromoteResult:
    from headstart.tracking import Registry

    name = model_name or cfg.register.model_name
    registry = Registry(cfg, name)
    version = str(version or _registered(cfg, name) or registry.latest())
    mv = registry.version(version)
    run = registry.run(mv.run_id)
    champion = registry.alias("champion")
    best = registry.alias("best") or champion  # a registry from before `best`: its champion is the reference
    checks = gates(run.data.tags, run.data.metrics, cfg.promote)
    d = {"model_name": name, "version": version, "champion_version": champion, "best_version": best}
    d.update(gates=checks, margin=cfg.promote.margin, comparison=None, best_comparison=None, note="")
    if champion not in (None, version) and all(g["passed"] for g in checks.values()):
        versions = [version, champion] + ([best] if best not in (None, champion) else [])
        rows, data_dir = _inputs.manifest(cfg), cfg.prepare.data_dir
        d.update(
            evidence(
                rows, data_dir, versions, registry.trained_on, registry.top1, cfg.promote, cfg.project.seed
            )
        )
    if champion == version:
        promoted, reason = True, f"v{version} already holds alias champion"
    else:
        promoted, reason = decide(checks, d["comparison"], d["margin"], d["note"], d["best_comparison"])
    d.update(promoted=promoted, reason=reason)
    markdown = to_markdown(d)
    with directory(cfg.stage_dir("promote")) as out:
        write_json(out / "decision.json", d)
        write_text(out / "summary.md", markdown)
    # the registry changes last, each a single call: a crash between them leaves exactly one champion
    registry.tag(version, version_tags(d))
    registry.log_text(mv.run_id, markdown, "promote/comparison.md")
    new_best = becomes_best(promoted, d["comparison"], d["best_comparison"])
    registry.move_aliases(version, promoted, champion, version if new_best else best)
    return PromoteResult(promoted, name, version, registry.alias("champion"), reason)


def _registered(cfg: Params, name: str) -> str | None:
    """The version this pipeline's register stage created, when it registered under `name`."""
    run_json = cfg.stage_dir("register") / "run.json"
    recorded = _inputs.read_json(cfg, "register", "run.json") if run_json.exists() else {}
    return recorded.get("model_version") if recorded.get("model_name") == name else None


def rollback(cfg: Params, model_name: str | None = None) -> PromoteResult:
    """`champion` back to the version holding `previous` (Registry.roll_back)."""
    from headstart.tracking import Registry

    name = model_name or cfg.register.model_name
    champion, demoted = Registry(cfg, name).roll_back()
    return PromoteResult(True, name, champion, champion, f"rolled back: champion v{demoted} -> v{champion}")
