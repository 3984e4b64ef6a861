"""Reading what earlier stages wrote, with an error that names the missing file and the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from headstart import HeadstartError
from headstart.config import Params


def stage_file(cfg: Params, stage: str, name: str) -> Path:
    path = cfg.stage_dir(stage) / name
    if not path.exists():
        raise HeadstartError(f"{path} does not exist; run the {stage} stage first")
    return path


def read_json(cfg: Params, stage: str, name: str) -> dict:
    return json.loads(stage_file(cfg, stage, name).read_text())


def prepared_manifest(cfg: Params) -> pd.DataFrame:
    """Every file found, with what decoding it found (prepare's output)."""
    return pd.read_parquet(stage_file(cfg, "prepare", "manifest.parquet"))


def manifest(cfg: Params) -> pd.DataFrame:
    """The images that passed validation, with their splits: what every training stage uses."""
    return pd.read_parquet(stage_file(cfg, "validate", "manifest.parquet"))


def split_paths(cfg: Params, frame: pd.DataFrame, split: str) -> tuple[pd.DataFrame, list[Path]]:
    rows = frame[frame["split"] == split].reset_index(drop=True)
    return rows, [cfg.prepare.data_dir / p for p in rows["path"]]
