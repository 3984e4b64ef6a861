"""The backbone every stage after `backbone` uses: under train_head.backbone `auto` the one the backbone
stage chose (artifacts/backbone/decision.json), else train_head.backbone itself, with its weights."""

from __future__ import annotations

from headstart import HeadstartError
from headstart.config import AUTO, Candidate, Params
from tasks import _inputs


def chosen(cfg: Params) -> Candidate:
    th = cfg.train_head
    if th.backbone != AUTO:
        return Candidate(name=th.backbone, weights=th.weights, weights_sha256=th.weights_sha256)
    decision = _inputs.read_json(cfg, "backbone", "decision.json")
    if decision.get("how") == "fixed":  # written before train_head.backbone became auto
        raise HeadstartError(
            f"{cfg.stage_dir('backbone') / 'decision.json'} records a fixed backbone, but "
            "train_head.backbone is auto; run the backbone stage again"
        )
    try:
        return Candidate(**decision["backbone"])
    except (KeyError, TypeError, ValueError) as exc:  # hand-edited or from another version
        raise HeadstartError(
            f"{cfg.stage_dir('backbone') / 'decision.json'} names no usable backbone "
            f"({type(exc).__name__}); run the backbone stage again"
        ) from None


def load(cfg: Params):
    """The chosen backbone, loaded (torch imported only here: register needs just the name)."""
    from headstart.backbones import load_backbone

    c = chosen(cfg)
    return load_backbone(c.name, c.weights, c.weights_sha256)


def name(cfg: Params) -> str:
    """The resolved name, or `auto` while no decision exists (a run that failed before choosing)."""
    try:
        return chosen(cfg).name
    except HeadstartError:
        return cfg.train_head.backbone
