"""prepare: scan the image folder into a manifest (each file decoded once) and split it: the split
ledger in the data folder keeps every image's split as the data grows; new images draw theirs by
content hash, and every class is served a test and a val image (headstart.data.manifest)."""

from __future__ import annotations

from dataclasses import dataclass, field

from headstart.atomic import directory, write_json, write_text
from headstart.config import Params
from headstart.data.manifest import (
    LEDGER,
    assign_splits,
    data_hash,
    ledger_scheme,
    ledger_text,
    read_ledger,
    scan,
)


@dataclass
class PrepareResult:
    n_files: int
    n_images: int
    n_unreadable: int
    classes: list[str]
    split_counts: dict[str, dict[str, int]]
    data_hash: str
    ledger: str = ""  # what the split ledger did, in words
    moved: list[str] = field(default_factory=list)  # kept images the rule had to move (a class lost one)


def prepare(cfg: Params) -> PrepareResult:
    p = cfg.prepare
    manifest = scan(p.data_dir, p.extensions, cfg.project.cache_dir)
    ok = manifest["readable"]
    scheme = ledger_scheme(cfg.project.seed, p.val_fraction, p.test_fraction)
    kept, note = read_ledger(p.data_dir, scheme)
    manifest["split"] = ""
    manifest.loc[ok, "split"] = assign_splits(
        manifest[ok], p.val_fraction, p.test_fraction, cfg.project.seed, kept
    )
    images = manifest[ok]
    moved = sorted(
        f"{path}: {kept[sha]} -> {split}"
        for path, sha, split in images[["path", "sha256", "split"]].itertuples(index=False)
        if kept.get(sha, split) != split
    )
    counts = {
        split: {c: int(n) for c, n in g["label"].value_counts().sort_index().items()}
        for split, g in images.groupby("split")
    }
    note = _keep_ledger(
        p.data_dir, kept | dict(zip(images["sha256"], images["split"], strict=True)), scheme, note
    )
    result = PrepareResult(
        len(manifest),
        len(images),
        int((~ok).sum()),
        sorted(images["label"].unique()),
        counts,
        data_hash(manifest),
        note,
        moved,
    )
    with directory(cfg.stage_dir("prepare")) as out:
        manifest.to_parquet(out / "manifest.parquet", index=False)
        # the ledger's note stays out: it differs between a first and a later run of the same data,
        # and the stages that read this report would rerun for it
        record = {k: v for k, v in result.__dict__.items() if k != "ledger"}
        write_json(out / "report.json", {"data_dir": str(p.data_dir), **record})
    return result


def _keep_ledger(data_dir, ledger: dict[str, str], scheme: str, note: str) -> str:
    """The ledger written back beside the images it splits (atomically); a data folder that cannot be
    written keeps the splits drawn for this run only, and the note says so."""
    text = ledger_text(ledger, scheme)
    path = data_dir / LEDGER
    try:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
    except OSError as exc:
        return f"{note}; not written ({exc.strerror}): splits of new images may change on a later run"
    return note
