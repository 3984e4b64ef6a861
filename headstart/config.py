"""Typed parameters: one pydantic model per params.yaml section, so a typo fails at load with its key."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from headstart import HeadstartError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectParams(Section):
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path = Path(".cache/headstart")
    seed: int = 0


class PrepareParams(Section):
    data_dir: Path = Path("data/raw")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_train(cls, v: float, info) -> float:
        if v + info.data.get("val_fraction", 0.0) >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return v


class TrainHeadParams(Section):
    backbone: str = "efficientnet_lite0"
    weights: Path | None = None
    weights_sha256: str | None = None
    hidden: int = Field(256, gt=0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(64, gt=0)
    max_epochs: int = Field(200, gt=0)
    patience: int = Field(15, gt=0)
    extract_batch_size: int = Field(32, gt=0)


class EvaluateParams(Section):
    batch_size: int = Field(32, gt=0)


class ExportParams(Section):
    opset: int = Field(18, ge=17)
    batch_size: int = Field(16, gt=0)
    max_abs_diff: float = Field(1e-3, gt=0.0)
    min_top1_agreement: float = Field(1.0, ge=0.0, le=1.0)


class RegisterParams(Section):
    model_name: str = "headstart-demo"


class MlflowParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: Path = Path("mlruns")
    experiment: str = "headstart"


# `register` is a stage name; it shadows ABCMeta.register, which nothing here uses
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    project: ProjectParams = ProjectParams()
    prepare: PrepareParams = PrepareParams()
    train_head: TrainHeadParams = TrainHeadParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    register: RegisterParams = RegisterParams()
    mlflow: MlflowParams = MlflowParams()

    def stage_dir(self, stage: str) -> Path:
        return self.project.artifacts_dir / stage


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` to the raw params; the value is parsed as YAML (1e-3, true, [a])."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise HeadstartError(f"override {override!r}: expected section.key=value")
    section, name = parts
    if section not in Params.model_fields:
        raise HeadstartError(f"override {override!r}: unknown section {section!r}")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise HeadstartError(f"params section {section!r} must be a mapping")
    raw[section][name] = yaml.safe_load(value) if value.strip() else None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (None or missing file = defaults), apply overrides, validate every key."""
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise HeadstartError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise HeadstartError(f"{path}: expected a mapping of sections")
    elif path is not None and Path(path) != Path("params.yaml"):
        raise HeadstartError(f"params file {path} does not exist")
    for override in overrides or []:
        apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise HeadstartError(f"{path or 'params'}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    msgs = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msgs.append(f"{key}: {msg}")
    return "; ".join(msgs)


def flatten(params: Params) -> dict[str, str]:
    """`section.key -> str(value)` for logging params to MLflow."""
    return {
        f"{section}.{key}": str(value)
        for section, values in params.model_dump(mode="json").items()
        for key, value in values.items()
    }
