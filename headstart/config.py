"""Typed parameters: one pydantic model per params.yaml section, so a typo fails at load with its key."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

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
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"]

    @field_validator("extensions")
    @classmethod
    def _dotted_extensions(cls, v: list[str]) -> list[str]:
        """`png`, `PNG` and `.png` all mean `.png`; anything that is not one file-name suffix is refused."""
        out = ["." + e.strip().lower().removeprefix(".") for e in v]
        for raw, e in zip(v, out, strict=True):
            if len(e) < 2 or any(c in e[1:] for c in "./\\*?[] "):
                raise ValueError(f"{raw!r} is not a file extension: write one suffix per entry, e.g. .png")
        if not out:
            raise ValueError("no extensions: list the image suffixes to read, e.g. [.png, .jpg]")
        return list(dict.fromkeys(out))

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_train(cls, v: float, info) -> float:
        if v + info.data.get("val_fraction", 0.0) >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return v


Level = Literal["fail", "warn"]
Runtime = Literal["auto", "onnxruntime", "torch", "torch-cuda"]


class ValidateLevels(Section):
    """What each expectation does when it fails: `fail` stops before training, `warn` records it."""

    every_file_is_a_readable_image: Level = "warn"
    no_empty_files: Level = "warn"
    paths_inside_data_root: Level = "warn"
    format_allowed: Level = "warn"
    mode_allowed: Level = "warn"
    width_in_bounds: Level = "warn"
    height_in_bounds: Level = "warn"
    labels_as_declared: Level = "fail"
    enough_classes: Level = "fail"
    min_per_class_per_split: Level = "fail"
    imbalance_below_warn_ratio: Level = "warn"
    imbalance_below_fail_ratio: Level = "fail"
    no_duplicates_across_splits: Level = "fail"
    no_near_duplicates_across_splits: Level = "warn"
    no_duplicates_across_classes: Level = "warn"
    no_near_duplicates_across_classes: Level = "warn"


class MinPerSplit(Section):
    train: int = Field(5, ge=0)
    val: int = Field(1, ge=0)
    test: int = Field(1, ge=0)


class ValidateParams(Section):
    formats: list[str] = ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"]
    modes: list[str] = [
        "1",
        "L",
        "LA",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "CMYK",
        "YCbCr",
        "I",
        "I;16",
        "I;16B",
        "I;16L",
        "F",
    ]
    min_size: int = Field(16, ge=1)
    max_size: int = Field(8000, ge=1)
    classes: list[str] | None = None
    min_classes: int = Field(2, ge=2)
    min_per_class: MinPerSplit = MinPerSplit()
    imbalance_warn_ratio: float = Field(3.0, ge=1.0)
    imbalance_fail_ratio: float = Field(20.0, ge=1.0)
    near_duplicate_distance: int = Field(2, ge=0, le=64)
    max_examples: int = Field(5, ge=1)
    levels: ValidateLevels = ValidateLevels()


class DomainParams(Section):
    on_mismatch: Literal["fail", "warn", "continue"] = "fail"
    max_images: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)


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
    runtime: Runtime = "auto"
    class_balance: Literal["weighted", "sampler", "none"] = "weighted"
    augment_views: int = Field(0, ge=0)


class FinetuneParams(Section):
    enabled: bool = True
    min_train_images: int = Field(1000, ge=0)
    require_shifted: bool = False
    unfreeze: int | Literal["all"] = 3
    lr: float = Field(2e-4, gt=0.0)
    backbone_lr_ratio: float = Field(0.5, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(32, gt=0)
    max_epochs: int = Field(12, gt=0)
    warmup_epochs: int = Field(1, ge=0)
    patience: int = Field(4, gt=0)
    grad_clip: float = Field(1.0, gt=0.0)
    margin: float = Field(0.005, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True


class EvaluateParams(Section):
    batch_size: int = Field(32, gt=0)


class Tolerance(Section):
    max_abs_diff: float = Field(1e-3, gt=0.0)
    min_top1_agreement: float = Field(1.0, ge=0.0, le=1.0)
    max_metric_diff: float = Field(0.0, ge=0.0)


class Tolerances(Section):
    fp32: Tolerance = Tolerance()
    fp16: Tolerance = Tolerance(max_abs_diff=0.5, min_top1_agreement=0.98, max_metric_diff=0.01)


class ExportParams(Section):
    opset: int = Field(18, ge=17)
    input: Literal["float32", "uint8"] = "float32"
    fp16: bool = True
    parity_batch_sizes: list[int] = Field(default_factory=lambda: [1, 7, 32], min_length=1)
    parity_max_images: int = Field(256, ge=1)
    require: list[Literal["fp32", "fp16"]] = ["fp32"]
    tolerances: Tolerances = Tolerances()


class RegisterParams(Section):
    model_name: str = "headstart-demo"


class PromoteParams(Section):
    enabled: bool = True
    min_test_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    allowed_verdicts: list[Literal["in_domain", "shifted", "mismatch"]] = ["in_domain", "shifted"]
    margin: float = Field(0.02, ge=0.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    n_bootstrap: int = Field(2000, ge=100)
    min_clean_images: int = Field(30, ge=2)


class ScheduleParams(Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    skip_unchanged: bool = True
    lock_wait_s: float = Field(0.0, ge=0.0)
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(10.0, ge=0.0)
    timeout_s: dict[str, float] = Field(default_factory=dict)
    default_timeout_s: float = Field(6 * 3600, gt=0)


class ServerParams(Section):
    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, gt=0, lt=65536)
    mlflow_port: int = Field(5000, gt=0, lt=65536)
    state_dir: Path = Path(".headstart")
    deployment: str = "nightly"


class MlflowParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: Path = Path("mlruns")
    experiment: str = "headstart"


# stage names `validate` and `register` shadow BaseModel.validate and ABCMeta.register, unused here
warnings.filterwarnings("ignore", message='Field name "(validate|register)"', category=UserWarning)


class Params(Section):
    project: ProjectParams = ProjectParams()
    prepare: PrepareParams = PrepareParams()
    validate: ValidateParams = ValidateParams()
    domain: DomainParams = DomainParams()
    train_head: TrainHeadParams = TrainHeadParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    register: RegisterParams = RegisterParams()
    promote: PromoteParams = PromoteParams()
    schedule: ScheduleParams = ScheduleParams()
    server: ServerParams = ServerParams()
    mlflow: MlflowParams = MlflowParams()

    def stage_dir(self, stage: str) -> Path:
        return self.project.artifacts_dir / stage


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key[.sub]=value` to the raw params; the value is parsed as YAML (1e-3, [a])."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise HeadstartError(f"override {override!r}: expected section.key=value")
    if parts[0] not in Params.model_fields:
        raise HeadstartError(f"override {override!r}: unknown section {parts[0]!r}")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HeadstartError(f"params key {'.'.join(parts[: depth + 1])!r} must be a mapping")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


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
    """`section.key[.sub] -> str(value)` for logging params to MLflow."""

    def walk(prefix: str, value: Any):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield prefix, str(value)

    return dict(walk("", params.model_dump(mode="json")))
