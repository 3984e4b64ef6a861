"""Reading what earlier stages wrote, with an error that names the missing file and the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from headstart import HeadstartError
from headstart.config import Params

# each selection candidate's model file: (stage, file in its folder)
MODEL_FILES = {"transfer": ("finetune", "model.pt"), "scratch": ("scratch", "model/model.pt")}


def stage_file(cfg: Params, stage: str, name: str) -> Path:
    path = cfg.stage_dir(stage) / name
    if not path.exists():
        raise HeadstartError(f"{path} does not exist; run the {stage} stage first")
    return path


def read_json(cfg: Params, stage: str, name: str) -> dict:
    path = stage_file(cfg, stage, name)
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # truncated, binary, unreadable: never a traceback
        raise _damaged(path, stage, exc) from None


def prepared_manifest(cfg: Params) -> pd.DataFrame:
    """Every file found, with what decoding it found (prepare's output)."""
    return _parquet(cfg, "prepare")


def manifest(cfg: Params) -> pd.DataFrame:
    """The images that passed validation, with their splits: what every training stage uses."""
    return _parquet(cfg, "validate")


def _parquet(cfg: Params, stage: str) -> pd.DataFrame:
    path = stage_file(cfg, stage, "manifest.parquet")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own types for a truncated or foreign file
        raise _damaged(path, stage, exc) from None


def _damaged(path: Path, stage: str, exc: Exception) -> HeadstartError:
    return HeadstartError(
        f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
        f"run the {stage} stage again"
    )


def split_paths(cfg: Params, frame: pd.DataFrame, split: str) -> tuple[pd.DataFrame, list[Path]]:
    rows = frame[frame["split"] == split].reset_index(drop=True)
    return rows, [cfg.prepare.data_dir / p for p in rows["path"]]
