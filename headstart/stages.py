"""THE list of stages, in pipeline order: what each runs, reads, writes and which params it depends on.

The Prefect flow, `headstart stage`, the benchmarks and the DVC consistency test all read it; dvc.yaml
spells the same facts for DVC and a test holds the two together. Functions are named as
"module:function" and imported only when a stage runs, so the library never imports tasks/.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...] = ()  # files earlier stages wrote, relative to project.artifacts_dir
    outs: tuple[str, ...] = ()  # what this stage writes there for later stages, DVC or the registry
    params: tuple[str, ...] = ()  # params.yaml sections or keys whose change must rerun the stage
    reads_data: bool = False  # reads the image folder itself (prepare.data_dir)
    files: tuple[str, ...] = ()  # package data it reads besides its code (derived from imports)
    artifact: str | None = None  # key of the Prefect markdown artifact made from its summary.md
    optional: str | None = None  # a boolean param that switches the stage off in the flow
    # params of where it reports as it runs (live curves to MLflow) or where it computes (engine: every
    # runner gives the same features): read, but no output depends on them, so DVC does not rerun the
    # stage when they change
    reports_to: tuple[str, ...] = ()
    # the flow runs it in a fresh process (headstart.ops.isolate): a heavy library only this stage
    # imports leaves with that process instead of staying in the flow's for the rest of the run. The
    # child gets cfg and nothing else of the flow's memory (no injected shard map, no patches)
    isolated: bool = False
    # modules the flow's spare child for an isolated stage imports ahead of it (headstart.ops.isolate
    # .prewarm), while the run starts: the heavy library's import is then off the run's critical path
    warm: tuple[str, ...] = ()
    # draws a figure (headstart.plots, in a child process): the flow starts that child as the stage
    # starts, so pyplot's import (~0.7 s) runs beside the stage's own work rather than after it
    draws: bool = False

    @property
    def target(self) -> str:
        """Its function as "module:function", importable by name in another process."""
        return f"tasks.{self.name}:{self.name}"

    @property
    def function(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


MANIFEST = "validate/manifest.parquet"  # the usable images with their splits: every later stage's input
BACKBONE = "backbone/decision.json"  # the backbone of every stage after it (train_head.backbone: auto)

STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        outs=("prepare/manifest.parquet", "prepare/report.json"),
        params=("project.seed", "prepare"),
        reads_data=True,
    ),
    Stage(
        "validate",
        deps=("prepare/manifest.parquet",),
        outs=(MANIFEST, "validate/quarantine.csv", "validate/report.json"),
        params=("validate",),  # the splits are prepare's, read from its manifest
        files=("headstart/static/datadocs",),  # the Data Docs' vendored CSS/JS/font (offline pages)
        artifact="data-validation",
        isolated=True,  # Great Expectations: ~120 MB (demo) that no later stage needs
        warm=("great_expectations", "tasks.validate"),  # ~3 s of imports
    ),
    Stage(
        "backbone",
        deps=(MANIFEST,),
        outs=("backbone/decision.json",),
        # train_head's settings (runtime, extraction, the head cross-validated on small data) score it
        params=("project.seed", "backbone", "train_head"),
        reads_data=True,
        artifact="backbone-choice",
    ),
    Stage(
        "domain",
        deps=(MANIFEST, BACKBONE),
        outs=("domain/report.json", "domain/profile.png"),
        # the backbone and runtime decide the statistics; this pass's features fill train_head's cache
        params=(
            "domain",
            "train_head.backbone",
            "train_head.weights",
            "train_head.weights_sha256",
            "train_head.runtime",
        ),
        reads_data=True,
        files=("headstart/domain_reference",),
        artifact="domain-check",
        draws=True,  # the BN divergence profile
    ),
    Stage(
        "train_head",
        deps=(MANIFEST, BACKBONE, "domain/report.json"),
        outs=(
            "train_head/model.pt",
            "train_head/history.json",
            "train_head/metrics.json",
            "train_head/search.json",
        ),
        # the domain pass put its features in the cache: which images it saw is an input here
        params=("project.seed", "train_head", "domain.max_images"),
        reads_data=True,
        reports_to=("mlflow", "register.model_name", "engine"),
    ),
    Stage(
        "finetune",
        deps=(MANIFEST, "domain/report.json", "train_head/model.pt", "train_head/metrics.json"),
        outs=("finetune/model.pt", "finetune/decision.json", "finetune/history.json"),
        params=("project.seed", "train_head", "finetune"),  # a kept model stores train_head's params
        reads_data=True,
        reports_to=("mlflow", "register.model_name"),
        artifact="finetune-decision",
    ),
    Stage(
        "scratch",
        deps=(MANIFEST, "domain/report.json"),
        # model/ holds model.pt only when the gate opened: a folder out exists either way
        outs=("scratch/model", "scratch/decision.json", "scratch/history.json"),
        params=("project.seed", "scratch", "domain.on_mismatch", "validate.min_per_split"),
        reads_data=True,
        reports_to=("mlflow", "register.model_name"),
        artifact="scratch-decision",
    ),
    Stage(
        "select",
        deps=(
            "train_head/metrics.json",
            "finetune/model.pt",
            "finetune/decision.json",
            "scratch/model",
            "scratch/decision.json",
        ),
        outs=("select/model.pt", "select/decision.json"),
        params=("select", "project.seed", "promote.n_bootstrap", "promote.confidence"),  # val CIs
        artifact="model-selection",
    ),
    Stage(
        "calibrate",
        # train_head's best epoch sets how long each cross-fitted head trains
        deps=(MANIFEST, "select/model.pt", "train_head/metrics.json"),
        outs=("calibrate/abstention.json", "calibrate/ood_gate.npz"),
        params=("serve", "project.seed", "train_head", "promote.n_bootstrap", "promote.confidence"),
        reads_data=True,
        artifact="abstention",
    ),
    Stage(
        "evaluate",
        # the transfer gain compares the two candidates themselves when both exist
        deps=(
            MANIFEST,
            "select/model.pt",
            "select/decision.json",
            "finetune/model.pt",
            "scratch/model",
            "calibrate/abstention.json",
            "calibrate/ood_gate.npz",
        ),
        outs=(
            "evaluate/metrics.json",
            "evaluate/confusion.json",
            "evaluate/confusion.png",
            "evaluate/predictions.csv",
        ),
        params=(
            "evaluate",
            "train_head.runtime",
            "project.seed",
            "promote.n_bootstrap",
            "promote.confidence",
        ),
        reads_data=True,
        artifact="test-metrics",
        draws=True,  # the confusion matrix
    ),
    Stage(
        "export",
        deps=(
            MANIFEST,
            "prepare/report.json",
            "select/model.pt",
            "calibrate/abstention.json",
            "calibrate/ood_gate.npz",
        ),
        # variants/ holds the optional variants that passed their gate (possibly none)
        outs=("export/model.onnx", "export/variants", "export/parity.json"),
        params=("export",),
        reads_data=True,
        artifact="export-parity",
    ),
    Stage(
        "register",
        deps=(
            "prepare/report.json",
            "validate/report.json",
            BACKBONE,
            "domain/report.json",
            "train_head/metrics.json",
            "train_head/history.json",
            "finetune/decision.json",
            "finetune/history.json",
            "scratch/decision.json",
            "scratch/history.json",
            "select/decision.json",
            "calibrate/abstention.json",
            "evaluate/metrics.json",
            "export/model.onnx",
            "export/variants",
            "export/parity.json",
        ),
        outs=("register/run.json",),
        params=(
            "register",
            "mlflow",
            "train_head.backbone",
            "train_head.weights",
            "train_head.weights_sha256",
        ),
    ),
    Stage(
        "promote",
        deps=("register/run.json", MANIFEST),
        outs=("promote/decision.json",),
        params=("project.seed", "promote", "register.model_name", "mlflow"),
        artifact="promotion",
        optional="promote.enabled",
    ),
    Stage(
        "report",  # last: the run report shows every stage's outputs, with thumbnails of the images
        deps=(
            "prepare/manifest.parquet",
            "prepare/report.json",
            MANIFEST,
            "validate/quarantine.csv",
            "validate/report.json",
            BACKBONE,
            "domain/report.json",
            "domain/profile.png",
            "train_head/metrics.json",
            "train_head/history.json",
            "train_head/search.json",
            "finetune/decision.json",
            "finetune/history.json",
            "scratch/decision.json",
            "scratch/history.json",
            "select/decision.json",
            "calibrate/abstention.json",
            "evaluate/metrics.json",
            "evaluate/confusion.png",
            "evaluate/predictions.csv",
            "export/parity.json",
            "register/run.json",
            "promote/decision.json",
        ),
        outs=("report",),
        params=("validate",),  # the near-duplicate pairs are drawn with validation's distance
        reads_data=True,
        artifact="run-report",
        reports_to=("mlflow", "register.model_name"),  # logged to the pipeline run
        draws=True,  # the training curves
    ),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; stages: {', '.join(NAMES)}")


def producer(dep: str) -> str:
    """The stage that writes `dep` (a path relative to the artifacts folder)."""
    return next(s.name for s in STAGES if dep in s.outs)


def require(cfg, stage: Stage) -> None:
    """Every file `stage` reads from earlier stages exists, or one line naming the first missing one
    and the stage that writes it."""
    from headstart import HeadstartError

    for dep in stage.deps:
        path = cfg.project.artifacts_dir / dep
        if not path.exists():
            before = producer(dep)
            raise HeadstartError(
                f"stage {stage.name} needs {path}, which stage {before} writes; "
                f"run `headstart stage {before}` (or the stages before it) first"
            )
