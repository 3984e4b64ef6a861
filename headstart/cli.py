"""The `headstart` command: the front door. Heavy imports happen inside commands, so --help is instant."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

from headstart import HeadstartError, __version__
from headstart.stages import NAMES as STAGES


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HeadstartError as exc:
        print(f"headstart: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headstart: interrupted; finished stages keep their artifacts", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="headstart",
        description="A folder of labelled images -> a validated, tracked, exported transfer-learning "
        "classifier. Start with `headstart run --data DIR`.",
    )
    ap.add_argument("--version", action="version", version=f"headstart {__version__}")
    sub = ap.add_subparsers(required=True, metavar="COMMAND")

    def with_params(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one param (repeatable)",
        )
        return p

    run = with_params(sub.add_parser("run", help="run the training flow (Prefect) end to end"))
    run.add_argument("--data", help="image folder <class>/<file> (sets prepare.data_dir)")
    run.add_argument(
        "--skip-unchanged",
        action="store_true",
        help="stop after prepare when data and params equal the last success",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="run every stage, even one whose inputs did not change, and register even an identical model",
    )
    run.set_defaults(func=_run)

    check = with_params(sub.add_parser("validate", help="prepare + validate a data folder; exit 0 or 1"))
    check.add_argument("--data", help="image folder <class>/<file> (sets prepare.data_dir)")
    check.set_defaults(func=_validate)

    dom = with_params(sub.add_parser("domain-check", help="prepare + validate + domain; exit 1 on mismatch"))
    dom.add_argument("--data", help="image folder <class>/<file> (sets prepare.data_dir)")
    dom.add_argument("--backbone", help="sets train_head.backbone")
    dom.add_argument("--json", action="store_true", help="print the report as JSON")
    dom.set_defaults(func=_domain_check)

    cal = sub.add_parser("domain-calibrate", help="measure a backbone's domain thresholds on offline sets")
    cal.add_argument("--backbone", default="efficientnet_lite0")
    cal.add_argument("--weights", help="weights file for a non-built-in backbone")
    cal.add_argument("--out", help="JSON file (default: the package's domain_reference/<backbone>.json)")
    cal.set_defaults(func=_domain_calibrate)

    stage = with_params(sub.add_parser("stage", help="run one stage without Prefect (dvc.yaml)"))
    stage.add_argument("name", choices=STAGES)
    stage.set_defaults(func=_stage)

    pred = with_params(sub.add_parser("predict", help="classify images with an exported model (onnxruntime)"))
    pred.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (recursive)"
    )
    pred.add_argument(
        "--model",
        default="artifacts/export/model.onnx",
        help="an ONNX file, or models:/NAME@ALIAS or models:/NAME/VERSION from the MLflow registry",
    )
    pred.add_argument(
        "--variant",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="with a models:/ URI: which exported file of that version (fp16 for GPUs, int8 for CPUs)",
    )
    pred.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    pred.add_argument("--batch-size", type=int, default=32)
    pred.add_argument("--providers", help="preference order, e.g. tensorrt,cuda,cpu (default)")
    pred.add_argument(
        "--no-abstain",
        action="store_true",
        help="the raw argmax and softmax for every image, ignoring the model's abstention rule",
    )
    pred.set_defaults(func=_predict)

    prom = with_params(
        sub.add_parser("promote", help="champion/challenger decision for a registered version")
    )
    prom.add_argument("--model", help="registered model name (default register.model_name)")
    prom.add_argument("--version", help="version to decide on (default: this pipeline's latest)")
    prom.add_argument("--rollback", action="store_true", help="move champion back to the previous version")
    prom.set_defaults(func=_promote)

    srv = with_params(
        sub.add_parser("server", help="start/stop a Prefect server and an MLflow server on loopback")
    )
    srv.add_argument("action", choices=("start", "stop", "status"))
    srv.set_defaults(func=_server)

    sched = with_params(
        sub.add_parser(
            "schedule", help="run the training flow on schedule.cron (a Prefect deployment; blocks)"
        )
    )
    sched.add_argument("--cron", help="overrides schedule.cron")
    sched.set_defaults(func=_schedule)

    serve = with_params(
        sub.add_parser("serve", help="serve a registered model over HTTP (mlflow models serve; blocks)")
    )
    serve.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION (default: champion)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    serve.add_argument("--port", type=int, default=5001, help="default 5001 (the tracking server has 5000)")
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=_serve)

    trt = with_params(sub.add_parser("export-triton", help="write a Triton model repository for a version"))
    trt.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    trt.add_argument("--out", required=True, help="the model repository folder (created if missing)")
    trt.add_argument("--name", help="the Triton model name (default: the registered name)")
    trt.add_argument("--variant", choices=["fp32", "fp16"], default="fp32", help="which exported file")
    trt.add_argument("--max-batch-size", type=int, default=32, help="Triton's max_batch_size (default 32)")
    trt.add_argument("--tensorrt", action="store_true", help="TensorRT accelerator at FP16 precision")
    trt.set_defaults(func=_export_triton)

    rep = with_params(
        sub.add_parser("report", help="rebuild the run report (artifacts/report/index.html) from artifacts/")
    )
    rep.add_argument(
        "--screenshot",
        type=Path,
        metavar="PNG",
        help="also render the page offline in headless Chromium and save a full-page screenshot",
    )
    rep.add_argument("--width", type=int, default=1280, help="the screenshot's width in px (default 1280)")
    rep.set_defaults(func=_report)

    show = with_params(sub.add_parser("params", help="print the resolved params as YAML"))
    show.set_defaults(func=_params)

    data = sub.add_parser("data", help="built-in data sets").add_subparsers(required=True, metavar="ACTION")
    pull = data.add_parser("pull", help="materialise a built-in data set as an image folder")
    pull.add_argument("dataset", choices=("elpv", "lfw"))
    pull.add_argument("--out", default="data/raw", help="empty or new folder (default data/raw)")
    pull.add_argument(
        "--task",
        default="defect",
        choices=("defect", "type"),
        help="elpv only: functional vs defective, or mono vs poly",
    )
    pull.add_argument("--per-class", type=int, help="at most N images per class")
    pull.add_argument("--seed", type=int, default=0, help="which images --per-class picks")
    pull.set_defaults(func=_pull)
    return ap


def _overrides(args) -> list[str]:
    """--set as given (YAML values); a path option as exactly that path, never read as YAML."""
    from headstart.config import literal

    data = getattr(args, "data", None)
    return list(args.overrides) + ([literal("prepare.data_dir", data)] if data else [])


def _run(args) -> int:
    from headstart.config import load_params
    from headstart.data.manifest import preflight
    from headstart.tracking import check_store, connect

    overrides = _overrides(args)
    cfg = load_params(args.params, overrides)
    preflight(cfg.prepare.data_dir, cfg.prepare.extensions)

    def meanwhile() -> None:  # while the temporary Prefect server starts (~4 s the run would wait)
        check_store(cfg)  # an unusable tracking store is found now, not at register after all the work
        from flows.training import prewarm

        prewarm()  # the isolated stages' children import their libraries beside all this
        connect(cfg)  # MLflow's import and its store's first schema check (~3 s on sqlite), once

    with _prefect_api(meanwhile):
        from flows.training import training

        state = training(
            params_file=args.params,
            overrides=overrides,
            skip_unchanged=args.skip_unchanged,
            force=args.force,
            return_state=True,
        )
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        _failure_report_line(cfg)
        raise HeadstartError(str(exc) if isinstance(exc, BaseException) else state.message)
    result = state.result()
    if result.get("skipped"):
        print(f"headstart: skipped: {result['reason']}")
        return 0
    _summary(result)
    return 0


def _prefect_api(meanwhile=None):
    from flows.api import prefect_api

    return prefect_api(meanwhile)


def _validate(args) -> int:
    from headstart.atomic import FAILED
    from headstart.config import load_params
    from headstart.validation import ValidationFailed
    from tasks.prepare import prepare
    from tasks.validate import validate

    cfg = load_params(args.params, _overrides(args))
    out = cfg.stage_dir("validate")
    with _writing(cfg):
        prepare(cfg)
        try:
            validate(cfg)
            code = 0
        except ValidationFailed as exc:
            print(f"headstart: {exc}", file=sys.stderr)
            out, code = out / FAILED, 1  # the report of the refused data; the last good stays
    print(f"\n{(out / 'summary.md').read_text()}")
    print(f"Data Docs: {out / 'data_docs' / 'index.html'}")
    return code


@contextmanager
def _writing(cfg):
    """The project lock every writer of artifacts takes (the flow, each stage, these commands); once
    held, what a killed writer left (temporary folders and files) is removed."""
    from headstart.atomic import sweep
    from headstart.ops.lock import exclusive

    with exclusive(cfg.project.cache_dir / "run.lock", cfg.schedule.lock_wait_s):
        sweep(cfg.project.artifacts_dir)
        yield


def _report(args) -> int:
    """The run report from what the stages wrote, a failed run's headed by its recorded error; not
    logged to MLflow (the run's own report was, when the flow or `dvc repro` wrote it)."""
    from headstart.config import load_params
    from tasks.report import recorded_failure, report

    cfg = load_params(args.params, _overrides(args))
    with _writing(cfg):
        r = report(cfg, *recorded_failure(cfg), log=False)
    print(f"headstart report: {r.path} ({r.bytes / 1e6:.2f} MB, {r.thumbnails} thumbnails, {r.seconds} s)")
    return _screenshot(Path(r.path), args.screenshot, args.width) if args.screenshot else 0


def _screenshot(page: Path, png: Path, width: int) -> int:
    """The page as a person sees it offline: a request that would leave the machine or an image that
    does not load fails the command (the shot is still written, to look at)."""
    from headstart.browser import render

    shot = render(page, png, width=width)
    problems = [f"external request {u}" for u in shot.external] + [
        f"image not loaded {u[:80]}" for u in shot.broken_images
    ]
    counts = f"{len(shot.images)} images, {len(shot.requests)} requests, {len(problems)} problems"
    print(f"screenshot: {png} ({counts})")
    for p in problems:
        print(f"headstart report: {p}", file=sys.stderr)
    return 1 if problems else 0


def _domain_check(args) -> int:
    import json

    from headstart.config import literal, load_params
    from tasks.backbone import backbone
    from tasks.domain import domain
    from tasks.prepare import prepare
    from tasks.validate import validate

    extra = ["domain.on_mismatch=continue"] + (
        [literal("train_head.backbone", args.backbone)] if args.backbone else []
    )
    cfg = load_params(args.params, _overrides(args) + extra)
    with _writing(cfg):
        prepare(cfg)
        validate(cfg)
        backbone(cfg)  # train_head.backbone auto: the check runs for the one it chooses
        result = domain(cfg)
    report = cfg.stage_dir("domain")
    print(
        json.dumps(json.loads((report / "report.json").read_text()), indent=2)
        if args.json
        else (report / "summary.md").read_text()
    )
    return 1 if result.verdict == "mismatch" else 0


def _domain_calibrate(args) -> int:
    import json
    from importlib import resources

    from headstart.atomic import write_json
    from headstart.backbones import load_backbone
    from headstart.domain import Probe, calibrate

    backbone = load_backbone(args.backbone, args.weights)
    ref = {
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        **calibrate(Probe(backbone), backbone.spec),
    }
    out = (
        Path(args.out)
        if args.out
        else Path(str(resources.files("headstart") / "domain_reference"))
        / (backbone.name.replace("/", "_") + ".json")
    )
    write_json(out, ref)
    print(json.dumps({k: ref[k] for k in ("thresholds", "auroc", "table")}, indent=2))
    print(f"headstart: wrote {out}")
    return 0


def _summary(r: dict) -> None:
    reg, ev, ex, th, va = r["register"], r["evaluate"], r["export"], r["train_head"], r["validate"]
    art = Path(r["artifacts_dir"])
    rate, diff = th["extract_images_per_s"], ex["max_abs_logit_diff"]
    speed = f" at {rate:.1f} img/s" if rate else ""
    scratch, abst = _scratch_lines(r), _abstention_lines(r)
    head = f"\n  head        {th['search']}" if th.get("search") else ""
    from headstart.metrics import ci_text

    acc = f"{ev['accuracy']:.4f}{ci_text(ev.get('accuracy_ci'), ev.get('ci_confidence', 0.95))}"
    print(f"""
headstart: done.
  data        {r["prepare"]["n_images"]} images, classes {", ".join(r["prepare"]["classes"])}
  validation  {va["n_quarantined"]} files quarantined, warnings: {", ".join(va["warnings"]) or "none"}
{_backbone_line(r)}  domain      {r["domain"]["verdict"]} (score {r["domain"]["score"]})
  features    {_features(th, speed, "train_head" in r.get("reused", {}))}{head}
  finetune    {"kept" if r["finetune"]["finetuned"] else "not used"}: {r["finetune"]["reason"]}{scratch}
  test        accuracy {acc}, macro-F1 {ev["macro_f1"]:.4f} on {ev["n_test"]} images{_estimate_line(ev)}{abst}
  parity      onnx = reference: top-1 agreement {ex["top1_agreement"]:.4f}, max |logit diff| {diff:.2e}
  metrics     {art / "evaluate" / "metrics.json"}  (plot: {art / "evaluate" / "confusion.png"})
  onnx        {ex["onnx_path"]}
  mlflow run  {reg["run_id"]} in {reg["tracking_uri"]} (experiment {reg["experiment_id"]})
  model       {reg["model_uri"]}{_registered_line(reg)}{_promotion_line(r)}{_reused_line(r)}
  browse      mlflow ui --backend-store-uri {reg["tracking_uri"]}{_report_line(r)}""")


def _estimate_line(ev: dict) -> str:
    """Which accuracy the gates and promotion use, and the signal test (absent from older results)."""
    if not ev.get("signal"):
        return ""
    from headstart.metrics import ci_text

    def figure(e: dict) -> str:
        ci = ci_text(e["accuracy_ci"], ev.get("ci_confidence", 0.95))
        return f"{e['accuracy']:.4f}{ci} on {e['n']} images"

    held, other = ev["estimates"].get("held_out"), ""
    if ev["estimate"] == "held_out":
        other = f" ({held['source']})"
    elif held:
        other = f"; held-out {figure(held)}"
    return (
        f"\n  estimate    the gates use the {ev['estimate'].replace('_', '-')} accuracy "
        f"{figure(ev['estimates'][ev['estimate']])}{other}"
        f"\n  signal      {ev['signal']}"
    )


def _report_line(r: dict) -> str:
    """Last: the run report, the page to open first (absent from results of a flow before it)."""
    return f"\n  report      {r['report']['path']}" if r.get("report") else ""


def _failure_report_line(cfg) -> None:
    from tasks.report import FAILURE

    folder = cfg.stage_dir("report")
    if (folder / FAILURE).exists():  # written by this failed run: a success removes it
        print(f"headstart: run report up to the failed stage: {folder / 'index.html'}", file=sys.stderr)


def _backbone_line(r: dict) -> str:
    return f"  backbone    {r['backbone']['line']}\n" if r.get("backbone") else ""


def _scratch_lines(r: dict) -> str:
    """scratch, select and the transfer gain (absent from results of a flow before those stages)."""
    from headstart.selection import gain_line

    if "select" not in r:
        return ""
    sc, se = r["scratch"], r["select"]
    val = f"; {se['val']}" if se.get("val") else ""  # the chosen candidate's, with its CI
    return (
        f"\n  scratch     {'trained' if sc['ran'] else 'not trained'}: {sc['reason']}"
        f"\n  select      {se['chosen']} ({se['kind']}): {se['reason']}{val}"
        f"\n  transfer gain  {gain_line(r['evaluate'].get('transfer_gain'))}"
    )


def _abstention_lines(r: dict) -> str:
    """calibrate's rule and what it did on the test split (absent from results of a flow before
    those stages)."""
    from headstart.calibration import selective_line

    if not r.get("calibrate") or not r["evaluate"].get("abstention"):
        return ""
    c = r["calibrate"]
    return (
        f"\n  calibrate   temperature {c['temperature']:.3f} on {c['n']} held-out images: {c['source']}"
        f"\n  abstention  {selective_line(r['evaluate']['abstention'])}"
    )


def _features(th: dict, speed: str, reused: bool) -> str:
    computed = f"{th['features_computed']} computed{speed}, {th['features_cached']} from the cache"
    return f"none: train_head reused (when it ran: {computed})" if reused else computed


def _registered_line(reg: dict) -> str:
    return "" if reg.get("registered", True) else f" ({reg['reason']})"


def _reused_line(r: dict) -> str:
    """Which stages this run reused (headstart.reuse) rather than ran, and since when."""
    if not r.get("reused"):
        return ""
    by_run: dict[str, list[str]] = {}
    for stage, run in r["reused"].items():
        by_run.setdefault(run, []).append(stage)
    return "\n  reused      " + "; ".join(
        f"{', '.join(s)} (from flow run {run})" for run, s in by_run.items()
    )


def _promotion_line(r: dict) -> str:
    p = r.get("promote")
    if not p:
        reg = r.get("register") or {}
        return "" if reg.get("registered", True) else "\n  promotion   skipped: the model did not change"
    status = "champion" if p["promoted"] else "challenger"
    return f"\n  promotion   v{p['version']} -> {status}: {p['reason']}"


def _stage(args) -> int:
    """One stage, as dvc repro runs it: under the project lock the flow takes, so a stage never
    overwrites artifacts a running flow (or another stage) is using."""
    from headstart.config import load_params
    from headstart.ops.memory import return_freed_buffers
    from headstart.stages import get, require

    return_freed_buffers()  # as the flow does
    cfg = load_params(args.params, _overrides(args))
    stage = get(args.name)
    if cfg.engine.runner != "local":
        import flows.shards  # noqa: F401  (the shard map on Prefect's task runners)
    with _writing(cfg):
        require(cfg, stage)
        if args.name == "prepare":  # under dvc repro the first stage opens the pipeline's MLflow run
            from headstart.tracking import pipeline_run

            pipeline_run(cfg, fresh=True)
        print(f"headstart {args.name}: {stage.function(cfg)}")
    return 0


def _predict(args) -> int:
    """Labels for every image; unreadable files are reported per file and the rest still predicted.
    Exit 0 when every file was predicted, 1 when some could not be read."""
    import json

    from headstart.runtime import Predictor

    if args.batch_size < 1:
        raise HeadstartError("--batch-size must be at least 1")
    files = _image_files(args.images)
    with ExitStack() as stack:
        model = args.model
        if model.startswith("models:/"):
            from headstart.config import load_params
            from headstart.tracking import downloaded_model

            cfg = load_params(args.params, _overrides(args))
            model = stack.enter_context(downloaded_model(model, cfg, args.variant))
        elif args.variant != "fp32":
            raise HeadstartError(
                "--variant picks a file inside a models:/ URI; give an ONNX file's path directly"
            )
        predictor = Predictor(model, providers=args.providers)
    results = predictor.predict_files(files, batch_size=args.batch_size, abstain=not args.no_abstain)
    for r in results:
        if args.json:
            keep = ("abstain", "reason") if r.error is None else ()  # null: answered, or --no-abstain
            print(json.dumps({k: v for k, v in r.__dict__.items() if v is not None or k in keep}))
        else:
            print(r.tsv())
    failed = sum(r.error is not None for r in results)
    print(
        f"headstart predict: {len(results) - failed} predicted{_abstained(results)}, {failed} unreadable; "
        f"providers {', '.join(predictor.providers)}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _abstained(results) -> str:
    """` (N abstained: K out_of_distribution, M ambiguous)`, or nothing when none did."""
    from collections import Counter

    reasons = Counter(r.reason for r in results if r.abstain)
    if not reasons:
        return ""
    by = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return f" ({sum(reasons.values())} abstained: {by})"


def _image_files(items: list[str]) -> list[Path]:
    """Files as given; folders walked for image extensions, in sorted order. Whatever is not a
    folder is kept (a FIFO, a device, a dangling link): predict reports why it was not read."""
    from headstart.config import PrepareParams

    extensions = {e.lower() for e in PrepareParams().extensions}
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in extensions)
        elif path.exists():
            out.append(path)
        else:
            raise HeadstartError(f"{item} does not exist")
    if not out:
        raise HeadstartError(f"no images in {', '.join(items)}")
    return out


def _promote(args) -> int:
    from headstart.config import load_params
    from headstart.tracking import check_store
    from tasks.promote import promote, rollback

    if args.version is not None and not (
        args.version.isascii() and args.version.isdigit() and int(args.version)
    ):
        raise HeadstartError(
            f"promote --version {args.version!r}: a registered model version is a positive "
            "integer (e.g. --version 7)"
        )
    cfg = load_params(args.params, _overrides(args))
    check_store(cfg)
    with _writing(cfg):
        if args.rollback:
            result = rollback(cfg, args.model)
        else:
            result = promote(cfg, args.version, args.model)
            print((cfg.stage_dir("promote") / "summary.md").read_text())
    print(
        f"headstart promote: {result.model_name} v{result.version}: {result.reason}; "
        f"champion is v{result.champion}"
    )
    return 0


def _server(args) -> int:
    from headstart.config import load_params
    from headstart.ops import server

    cfg = load_params(args.params, _overrides(args))
    if args.action == "start":
        where = server.start(cfg)
        ui = where["prefect"].removesuffix("/api")
        print(f"headstart: Prefect {where['prefect']} (UI {ui}), MLflow {where['mlflow']}")
        print(f"headstart: state in {where['state']}; use them with:")
        for k, v in server.env(cfg).items():
            print(f"  export {k}={v}")
    elif args.action == "stop":
        print(f"headstart: stopped {', '.join(server.stop(cfg)) or 'nothing (not running)'}")
    else:
        state = server.status(cfg)
        print(
            "headstart: "
            + (", ".join(f"{k} {'running' if v else 'stopped'}" for k, v in state.items()) or "not started")
        )
    return 0


def _schedule(args) -> int:
    """The training flow as a deployment with a cron schedule, run by this process (Prefect's
    flow.serve: Prefect's word; headstart keeps `serve` for models)."""
    import os

    from headstart.config import load_params
    from headstart.ops import server

    cfg = load_params(args.params, _overrides(args))
    os.environ.setdefault("PREFECT_API_URL", server.prefect_api(cfg))
    from flows.training import training

    cron = args.cron or cfg.schedule.cron
    print(
        f"headstart: serving deployment training/{cfg.server.deployment} on '{cron}' "
        f"({cfg.schedule.timezone}) "
        f"against {os.environ['PREFECT_API_URL']}; Ctrl-C stops"
    )
    from prefect.schedules import Cron

    training.serve(
        name=cfg.server.deployment,
        schedules=[Cron(cron, timezone=cfg.schedule.timezone)],
        parameters={
            "params_file": str(Path(args.params).resolve()),
            "overrides": _overrides(args),
            "skip_unchanged": cfg.schedule.skip_unchanged,
        },
        tags=["headstart"],
        limit=1,  # one run at a time from this runner; the project lock guards against other runners
    )
    return 0


def _serve(args) -> int:
    """A registered version over HTTP through MLflow's own scoring server, run in place of this process
    (its signals and exit code are the server's), against the project's tracking store."""
    import os

    from headstart.config import load_params
    from headstart.tracking import check_store

    cfg = load_params(args.params, _overrides(args))
    uri = args.model or f"models:/{cfg.register.model_name}@champion"
    if not uri.startswith("models:/"):
        raise HeadstartError(f"serve --model {uri!r}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    store = check_store(cfg)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///").split("?")[0]).is_file():
        raise HeadstartError(
            f"no MLflow store at {store}; set --set mlflow.tracking_uri=... or MLFLOW_TRACKING_URI"
        )
    _check_registered(cfg, uri)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    print(
        f"headstart: serving {uri} from {store} on http://{args.host}:{args.port}/invocations",
        file=sys.stderr,
    )
    sys.stderr.flush()
    # MLflow starts its server as `exec uvicorn` through a shell: uvicorn must be on PATH even when
    # this venv is not activated (headstart called by its full path)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execve(cmd[0], cmd, {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": path})
    return 0  # not reached: execve replaced this process


def _check_registered(cfg, uri: str) -> None:
    """A missing alias or version as one line now, not a traceback from the server later."""
    from headstart.tracking import Registry

    name, sep, alias = uri.removeprefix("models:/").partition("@")
    if sep:
        if Registry(cfg, name).alias(alias) is None:
            raise HeadstartError(
                f"{uri}: no version of {name!r} holds alias {alias!r}; see headstart promote"
            )
    else:
        name, _, version = name.partition("/")
        Registry(cfg, name).version(version)


def _export_triton(args) -> int:
    from headstart.config import load_params
    from headstart.triton import export_triton

    cfg = load_params(args.params, _overrides(args))
    done = export_triton(
        args.model, cfg, args.out, args.name, args.variant, args.max_batch_size, args.tensorrt
    )
    print(f"headstart: wrote {done.path} ({done.schema})")
    print(f"headstart: serve it: tritonserver --model-repository {Path(args.out).resolve()}")
    print(f"headstart: ask it:   python {done.path / 'client.py'} --model {done.path.name} IMAGE...")
    return 0


def _params(args) -> int:
    import yaml

    from headstart.config import load_params

    cfg = load_params(args.params, _overrides(args))
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _pull(args) -> int:
    from headstart.data.builtin import pull

    counts = pull(args.dataset, args.out, args.task, args.per_class, args.seed)
    print(
        f"headstart: {sum(counts.values())} images into {args.out}: "
        + ", ".join(f"{c} {n}" for c, n in counts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
