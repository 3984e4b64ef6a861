"""prepare: scan the image folder into a manifest (each file decoded once), split it by content hash."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.atomic import directory, write_json
from headstart.config import Params
from headstart.data.manifest import assign_splits, data_hash, scan


@dataclass
class PrepareResult:
    n_files: int
    n_images: int
    n_unreadable: int
    classes: list[str]
    split_counts: dict[str, dict[str, int]]
    data_hash: str


def prepare(cfg: Params) -> PrepareResult:
    p = cfg.prepare
    manifest = scan(p.data_dir, p.extensions, cfg.project.cache_dir)
    ok = manifest["readable"]
    manifest["split"] = ""
    manifest.loc[ok, "split"] = assign_splits(manifest[ok], p.val_fraction, p.test_fraction, cfg.project.seed)
    images = manifest[ok]
    counts = {
        split: {c: int(n) for c, n in g["label"].value_counts().sort_index().items()}
        for split, g in images.groupby("split")
    }
    result = PrepareResult(
        len(manifest),
        len(images),
        int((~ok).sum()),
        sorted(images["label"].unique()),
        counts,
        data_hash(manifest),
    )
    with directory(cfg.stage_dir("prepare")) as out:
        manifest.to_parquet(out / "manifest.parquet", index=False)
        write_json(out / "report.json", {"data_dir": str(p.data_dir), **result.__dict__})
    return result
