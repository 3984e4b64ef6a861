"""prepare: scan the image folder into a manifest with content hashes, and split it by hash."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.atomic import directory, write_json
from headstart.config import Params
from headstart.data.manifest import assign_splits, data_hash, scan


@dataclass
class PrepareResult:
    n_images: int
    n_skipped: int
    classes: list[str]
    split_counts: dict[str, dict[str, int]]
    data_hash: str


def prepare(cfg: Params) -> PrepareResult:
    p = cfg.prepare
    found = scan(p.data_dir, p.extensions)
    manifest = found.manifest
    manifest["split"] = assign_splits(manifest, p.val_fraction, p.test_fraction, cfg.project.seed)
    counts = {
        split: {c: int(n) for c, n in g["label"].value_counts().sort_index().items()}
        for split, g in manifest.groupby("split")
    }
    result = PrepareResult(
        len(manifest), len(found.skipped), sorted(manifest["label"].unique()), counts, data_hash(manifest)
    )
    with directory(cfg.stage_dir("prepare")) as out:
        manifest.to_parquet(out / "manifest.parquet", index=False)
        found.skipped.to_csv(out / "skipped.csv", index=False)
        write_json(
            out / "report.json",
            {"data_dir": str(p.data_dir), **result.__dict__, "skipped": found.skipped.to_dict("records")},
        )
    for row in found.skipped.itertuples():
        print(f"skipped {p.data_dir / row.path}: {row.reason}")
    return result
