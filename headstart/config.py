"""Typed parameters: one pydantic model per params.yaml section, so a typo fails at load with its key."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from headstart import HeadstartError


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's `true` would otherwise pass as 1.0
        raise ValueError("expected a number, got a boolean")
    return value


# Strict: YAML's `true` would silently become 1 and the string "1e11" a huge int.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_bool)]

# Upper bounds on sizes, far above any sensible setting and below what exhausts a machine: a batch of
# 4096 images at 224 px is 2.4 GB of float32; a head of 16384 hidden units is larger than the backbone;
# 100,000 epochs of even a tiny head take days.
MAX_BATCH = 4096
MAX_HIDDEN = 16384
MAX_EPOCHS = 100_000
MAX_IMAGES = 1_000_000
MAX_SECONDS = 30 * 86400.0


class Section(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` is never a meaningful param value
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ProjectParams(Section):
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path = Path(".cache/headstart")
    seed: Int = Field(0, ge=0, lt=2**32)  # numpy seeds are 32-bit


class PrepareParams(Section):
    data_dir: Path = Path("data/raw")
    val_fraction: Float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: Float = Field(0.2, gt=0.0, lt=1.0)
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
    train: Int = Field(1, ge=0)
    val: Int = Field(0, ge=0)  # the head is chosen by cross-validation over train+val on few images
    test: Int = Field(1, ge=0)


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
    min_size: Int = Field(8, ge=1, le=65535)  # 8x8 digits are data; params.yaml says why; 65535: JPEG's limit
    max_size: Int = Field(8000, ge=1, le=65535)
    classes: list[str] | None = None
    min_classes: Int = Field(2, ge=2)
    min_per_class: Int = Field(5, ge=1, le=MAX_IMAGES)  # usable images per class, all splits together
    min_per_split: MinPerSplit = MinPerSplit()
    imbalance_warn_ratio: Float = Field(3.0, ge=1.0)
    imbalance_fail_ratio: Float = Field(20.0, ge=1.0)
    near_duplicate_distance: Int = Field(2, ge=0, le=64)
    max_examples: Int = Field(5, ge=1, le=1000)
    levels: ValidateLevels = ValidateLevels()

    @field_validator("min_per_class", mode="before")
    @classmethod
    def _a_count(cls, v: Any) -> Any:
        if isinstance(v, dict):  # the per-split form this key once had
            raise ValueError(
                "a number of images per class (all splits together); per-split minimums are "
                "validate.min_per_split, e.g. {train: 1, val: 0, test: 1}"
            )
        return v


class Candidate(Section):
    """A backbone to rank: a registry or timm name, with a local weights file when it is not built in."""

    name: str = Field(min_length=1)
    weights: Path | None = None
    weights_sha256: str | None = None

    @field_validator("name")
    @classmethod
    def _not_auto(cls, v: str) -> str:
        if v == AUTO:
            raise ValueError("`auto` is what train_head.backbone says to choose, not a backbone to rank")
        return v


AUTO = "auto"  # train_head.backbone: choose among backbone.candidates (the backbone stage)


class BackboneParams(Section):
    candidates: list[Candidate] = Field(
        default_factory=lambda: ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
        min_length=1,
        validate_default=True,
    )
    max_images: Int = Field(256, ge=2, le=MAX_IMAGES)

    @field_validator("candidates", mode="before")
    @classmethod
    def _names_or_entries(cls, v: Any) -> Any:
        """A bare name is a candidate with its packaged or hub weights."""
        return [{"name": c} if isinstance(c, str) else c for c in v] if isinstance(v, list) else v

    @field_validator("candidates")
    @classmethod
    def _named_once(cls, v: list[Candidate]) -> list[Candidate]:
        names = [c.name for c in v]
        if len(set(names)) < len(names):
            raise ValueError(f"a backbone is listed twice: {names}")
        return v


class DomainParams(Section):
    on_mismatch: Literal["scratch", "fail", "warn", "continue"] = "scratch"
    max_images: Int = Field(128, gt=0, le=MAX_IMAGES)
    batch_size: Int = Field(32, gt=0, le=MAX_BATCH)


class SearchParams(Section):
    trials: Int = Field(20, ge=0, le=10_000)  # Optuna trials; 0: no search, the settings as given
    timeout_s: Float = Field(300.0, gt=0.0, le=MAX_SECONDS)  # a cap; hitting it is recorded
    folds: Int = Field(5, ge=2, le=50)
    cv_max_images: Int = Field(1000, ge=0, le=MAX_IMAGES)  # train+val below this: k-fold CV, refit on both


class TrainHeadParams(Section):
    backbone: str = "efficientnet_lite0"
    weights: Path | None = None
    weights_sha256: str | None = None
    hidden: Int = Field(256, ge=0, le=MAX_HIDDEN)  # 0: a linear head (logistic regression on the features)
    dropout: Float = Field(0.2, ge=0.0, lt=1.0)
    lr: Float = Field(1e-3, gt=0.0, le=10.0)  # AdamW diverges far below 10
    weight_decay: Float = Field(1e-4, ge=0.0)
    batch_size: Int = Field(64, gt=0, le=MAX_BATCH)
    max_epochs: Int = Field(200, gt=0, le=MAX_EPOCHS)
    patience: Int = Field(15, gt=0, le=MAX_EPOCHS)
    extract_batch_size: Int = Field(32, gt=0, le=MAX_BATCH)
    runtime: Runtime = "auto"
    class_balance: Literal["weighted", "sampler", "none"] = "weighted"
    augment_views: Int = Field(0, ge=0, le=64)  # each view is a full extra feature pass
    search: SearchParams = SearchParams()


class FinetuneParams(Section):
    enabled: bool = True
    min_train_images: Int = Field(1000, ge=0, le=10**9)
    require_shifted: bool = False
    unfreeze: Int | Literal["all"] = 3
    lr: Float = Field(2e-4, gt=0.0, le=10.0)
    backbone_lr_ratio: Float = Field(0.5, gt=0.0, le=1.0)
    weight_decay: Float = Field(1e-4, ge=0.0)
    batch_size: Int = Field(32, gt=0, le=MAX_BATCH)
    max_epochs: Int = Field(12, gt=0, le=MAX_EPOCHS)
    warmup_epochs: Int = Field(1, ge=0, le=MAX_EPOCHS)
    patience: Int = Field(4, gt=0, le=MAX_EPOCHS)
    grad_clip: Float = Field(1.0, gt=0.0)
    margin: Float = Field(0.005, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True


class ScratchParams(Section):
    run: Literal["auto", "always", "never"] = "auto"
    size: Annotated[Int, Field(ge=8, le=512)] | Literal["auto"] = "auto"
    flip: bool = False
    lr: Float = Field(2e-3, gt=0.0, le=10.0)
    weight_decay: Float = Field(0.05, ge=0.0)
    batch_size: Int = Field(64, gt=0, le=MAX_BATCH)
    max_epochs: Int = Field(60, gt=0, le=MAX_EPOCHS)
    warmup_epochs: Int = Field(3, ge=0, le=MAX_EPOCHS)
    patience: Int = Field(10, gt=0, le=MAX_EPOCHS)
    label_smoothing: Float = Field(0.1, ge=0.0, lt=1.0)
    class_balance: Literal["weighted", "sampler", "none"] = "weighted"
    min_train_images: Int = Field(1000, ge=0, le=10**9)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True


class SelectParams(Section):
    margin: Float = Field(0.01, ge=0.0, le=1.0)


class EvaluateParams(Section):
    batch_size: Int = Field(32, gt=0, le=MAX_BATCH)
    min_test_images: Int = Field(100, ge=1, le=MAX_IMAGES)  # fewer: calibrate's held-out estimate decides
    signal_confidence: Float = Field(0.95, ge=0.0, lt=1.0)  # "learned something" (0: off)


class Tolerance(Section):
    max_abs_diff: Float = Field(1e-3, gt=0.0)
    min_top1_agreement: Float = Field(1.0, ge=0.0, le=1.0)
    max_metric_diff: Float = Field(0.0, ge=0.0)


class Tolerances(Section):
    fp32: Tolerance = Tolerance()
    fp16: Tolerance = Tolerance(max_abs_diff=0.5, min_top1_agreement=0.98, max_metric_diff=0.01)
    int8: Tolerance = Tolerance(max_abs_diff=3.0, min_top1_agreement=0.97, max_metric_diff=0.02)


class ExportParams(Section):
    opset: Int = Field(18, ge=17, le=99)
    input: Literal["float32", "uint8"] = "float32"
    fp16: bool = True
    int8: bool = False
    int8_calibration_images: Int = Field(128, ge=1, le=MAX_IMAGES)
    parity_batch_sizes: list[Annotated[Int, Field(gt=0, le=MAX_BATCH)]] = Field(
        default_factory=lambda: [1, 7, 32], min_length=1
    )
    parity_max_images: Int = Field(256, ge=1, le=MAX_IMAGES)
    require: list[Literal["fp32", "fp16", "int8"]] = ["fp32"]
    tolerances: Tolerances = Tolerances()


class ServingParams(Section):
    max_images: Int = Field(256, gt=0, le=MAX_IMAGES)  # per request to the served pyfunc: more -> HTTP 400
    batch_size: Int = Field(32, gt=0, le=MAX_BATCH)  # images decoded and run at a time


class RegisterParams(Section):
    model_name: str = "headstart-demo"
    serving: ServingParams = ServingParams()

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, v: str) -> str:
        # MLflow refuses these only at register, after all the work; say so at load
        if not v.strip() or "/" in v or ":" in v or len(v) > 256:
            raise ValueError(
                f"{v!r}: a registered model name must be non-empty, at most 256 characters, "
                "without '/' or ':'"
            )
        return v


class PromoteParams(Section):
    enabled: bool = True
    min_accuracy: Float = Field(0.0, ge=0.0, le=1.0)  # on the estimate evaluate chose
    allowed_verdicts: list[Literal["in_domain", "shifted", "mismatch"]] = ["in_domain", "shifted"]
    margin: Float = Field(0.02, ge=0.0)
    confidence: Float = Field(0.95, gt=0.5, lt=1.0)
    n_bootstrap: Int = Field(2000, ge=100, le=1_000_000)
    min_clean_images: Int = Field(30, ge=2, le=10**9)


class ServeParams(Section):
    """The abstention rule the calibrate stage fits and every exported model carries."""

    alpha: Float = Field(0.1, gt=0.0, le=0.5)  # above 0.5 a "guarantee" is mostly abstention
    ood_alpha: Float = Field(0.05, gt=0.0, le=0.5)  # the gate's share of the error budget
    min_calibration: Int = Field(100, ge=0, le=MAX_IMAGES)
    folds: Int = Field(5, ge=2, le=100)

    @model_validator(mode="after")
    def _gate_within_budget(self):
        if self.ood_alpha > self.alpha:
            raise ValueError(f"serve.ood_alpha ({self.ood_alpha}) must be <= serve.alpha ({self.alpha})")
        return self


class ScheduleParams(Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    skip_unchanged: bool = True
    lock_wait_s: Float = Field(0.0, ge=0.0, le=MAX_SECONDS)
    retries: Int = Field(2, ge=0, le=100)
    retry_delay_s: Float = Field(10.0, ge=0.0, le=86400.0)
    timeout_s: dict[str, Annotated[Float, Field(gt=0, le=MAX_SECONDS)]] = Field(default_factory=dict)
    default_timeout_s: Float = Field(6 * 3600, gt=0, le=MAX_SECONDS)


class ServerParams(Section):
    host: str = "127.0.0.1"
    prefect_port: Int = Field(4200, gt=0, lt=65536)
    mlflow_port: Int = Field(5000, gt=0, lt=65536)
    state_dir: Path = Path(".headstart")
    deployment: str = "nightly"
    # None: the embedded SQLite stores (Prefect's in state_dir, MLflow's mlflow.tracking_uri)
    prefect_database_url: str | None = None
    mlflow_backend_store_uri: str | None = None

    @field_validator("prefect_database_url", "mlflow_backend_store_uri")
    @classmethod
    def _a_database(cls, url: str | None, info) -> str | None:
        schemes = {
            "prefect_database_url": ("postgresql+asyncpg://", "sqlite+aiosqlite://"),
            # SQLAlchemy 2.1's bare postgresql:// means psycopg 3, not installed; psycopg2 is
            "mlflow_backend_store_uri": ("postgresql+psycopg2://", "mysql", "mssql", "sqlite:"),
        }[info.field_name]
        if url is None:
            return url
        if not url.startswith(schemes):
            raise ValueError(f"expected a database URL starting {' or '.join(schemes)}")
        if urlsplit(url).password is not None:  # params are logged to MLflow with every run
            raise ValueError("no password in the URL: use PGPASSWORD or ~/.pgpass")
        return url


class EngineParams(Section):
    """How feature extraction runs: in this process, or sharded over worker processes or a Dask
    cluster (headstart.shards). Every runner computes the same features, so none of these keys is a
    stage's DVC param: changing them never reruns a stage."""

    runner: Literal["local", "process", "dask"] = "local"
    workers: Int = Field(2, ge=1, le=4096)  # process pool size, or the LocalCluster's worker processes
    threads: Int = Field(
        0, ge=0, le=1024
    )  # onnxruntime threads per worker; 0: this machine's cores / workers
    shard_size: Int = Field(256, ge=1, le=MAX_IMAGES)  # images per shard (one task run)
    dask_address: str = ""  # an existing Dask scheduler (tcp://host:8786); empty: a LocalCluster here
    connect_timeout_s: Float = Field(10.0, gt=0.0, le=3600.0)  # a scheduler that does not answer: fail
    retries: Int = Field(2, ge=0, le=100)  # per shard (Prefect task retries; a dead pool: a fresh one)


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
    backbone: BackboneParams = BackboneParams()
    domain: DomainParams = DomainParams()
    train_head: TrainHeadParams = TrainHeadParams()
    finetune: FinetuneParams = FinetuneParams()
    scratch: ScratchParams = ScratchParams()
    select: SelectParams = SelectParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    register: RegisterParams = RegisterParams()
    promote: PromoteParams = PromoteParams()
    serve: ServeParams = ServeParams()
    schedule: ScheduleParams = ScheduleParams()
    server: ServerParams = ServerParams()
    mlflow: MlflowParams = MlflowParams()
    engine: EngineParams = EngineParams()

    def stage_dir(self, stage: str) -> Path:
        return self.project.artifacts_dir / stage

    @model_validator(mode="after")
    def _weights_name_a_backbone(self) -> Params:
        th = self.train_head
        if th.backbone == AUTO and (th.weights or th.weights_sha256):
            raise ValueError(
                "train_head.weights belongs to a named train_head.backbone; with `auto`, give each "
                "candidate's weights in backbone.candidates ({name: ..., weights: FILE})"
            )
        return self

    @model_validator(mode="after")
    def _folders_apart(self) -> Params:
        """Outputs never land among the inputs: writing a stage's folder would replace a class folder
        of the same name, and the cache or the artifacts would be scanned as images."""
        folders = {
            "prepare.data_dir": self.prepare.data_dir,
            "project.artifacts_dir": self.project.artifacts_dir,
            "project.cache_dir": self.project.cache_dir,
        }
        resolved = {key: Path(path).expanduser().resolve() for key, path in folders.items()}
        keys = list(resolved)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                pa, pb = resolved[a], resolved[b]
                if pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa):
                    raise ValueError(
                        f"{a} ({folders[a]}) and {b} ({folders[b]}) overlap (the same folder or one "
                        "inside the other), so outputs would land among inputs; give each its own folder"
                    )
        return self


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
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise HeadstartError(
            f"--set {key.strip()}: the value {value!r} is not valid YAML ({problem}); "
            f"quote it, e.g. --set '{key.strip()}=\"{value}\"'"
        ) from None


def literal(key: str, value: str | Path) -> str:
    """The override that sets `key` to exactly the string `value`, never read as YAML: a path like
    `photos #2`, `2024-01-01`, `yes` or `*raw` stays that path. Every character outside printable
    ASCII is escaped (\\U........), so tabs, newlines, emoji and undecodable bytes survive."""
    text = str(value)
    escaped = "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return f'{key}="{escaped}"'


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (None or missing file = defaults), apply overrides, validate every key."""
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        raw = _read_params(Path(path))
    elif path is not None and Path(path) != Path("params.yaml"):
        raise HeadstartError(f"params file {path} does not exist")
    for override in overrides or []:
        apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise HeadstartError(f"{path or 'params'}: {_describe(exc)}") from None


def _read_params(path: Path) -> dict[str, Any]:
    """The params file's mapping; anything else (a folder, binary, UTF-16, not YAML) is one line."""
    if path.is_dir():
        raise HeadstartError(f"params file {path} is a folder; give a YAML file (e.g. --params params.yaml)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HeadstartError(f"params file {path}: cannot read it ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        kind = "UTF-16 text" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8 text"
        raise HeadstartError(f"params file {path}: {kind}; save it as UTF-8 YAML") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise HeadstartError(f"params file {path}: not valid YAML ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise HeadstartError(f"params file {path}: expected a mapping of sections (project:, prepare:, ...)")
    return raw


def _describe(exc: ValidationError) -> str:
    msgs = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msgs.append(f"{key}: unknown key")
        elif not err["loc"]:  # a check across sections
            msgs.append(msg)
        else:
            msgs.append(f"{key}: {msg} (got {str(err['input'])[:60]!r})")
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
