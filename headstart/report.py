"""The run report: one self-contained HTML page (artifacts/report/index.html) that shows a run's story
with the images themselves: the data, the quarantine, duplicate pairs, the domain check, training,
each decision and its reason, test metrics with the misclassified images, abstentions, export parity
and the promotion.

It reads only what the stages wrote (and the images, for thumbnails), so it can be rebuilt from
artifacts/ at any time. Every section has a stable id; images are bounded thumbnails embedded as
data: URIs; links point beside the page (relative); nothing loads from the network. A missing or
damaged stage output makes its section say so, never breaks the page. A failed run's report stops
at the failed stage, headed by why; later stages' outputs (an earlier run's) are not shown.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from headstart.atomic import FAILED
from headstart.config import ValidateParams
from headstart.plots import drawn

THUMB = 96  # px, the longer side of a thumbnail
# how many images each section shows at most: 10,000 images make a page of the same bounded size
LIMITS = {
    "examples": 4,  # per class
    "example_classes": 24,
    "quarantine": 24,
    "pairs": 12,
    "furthest": 8,
    "misclassified": 24,
    "abstained": 24,
}
SECTIONS = (  # (id, title, the stage whose outputs it shows)
    ("data", "Data", "prepare"),
    ("quarantine", "Quarantine", "validate"),
    ("validation", "Validation", "validate"),
    ("duplicates", "Duplicates", "validate"),
    ("backbone", "Backbone", "backbone"),
    ("domain", "Domain check", "domain"),
    ("training", "Training", "train_head"),
    ("finetune", "Fine-tuning", "finetune"),
    ("scratch", "From scratch", "scratch"),
    ("select", "Selection", "select"),
    ("test", "Test metrics", "evaluate"),
    ("abstention", "Abstention", "calibrate"),
    ("export", "Export parity", "export"),
    ("promotion", "Promotion", "promote"),
)


class Missing(Exception):
    """A stage output the report cannot show, with the sentence that says why."""


@dataclass
class Run:
    """Where a run's outputs are and how far it got: `failed` names the stage that failed (its
    outputs are read from its failed/ folder when its gate left them there), `error` says why."""

    artifacts: Path
    data_dir: Path
    stages: tuple[str, ...]
    failed: str | None = None
    error: str | None = None
    validate: ValidateParams | None = None  # the near-duplicate distance validation used
    _thumbs: dict = field(default_factory=dict, repr=False)

    def path(self, stage: str, name: str) -> Path:
        if self.failed and stage in self.stages and self.stages.index(stage) > self.stages.index(self.failed):
            raise Missing(f"not run: the run stopped at stage {self.failed}")
        # the failed stage's own outputs are those its gate left in failed/; beside them lie an
        # earlier run's, which this run did not produce
        found = self.artifacts / stage / (f"{FAILED}/{name}" if stage == self.failed else name)
        if not found.exists():
            raise Missing(
                f"stage {stage} failed" if stage == self.failed else f"not run ({stage}/{name} absent)"
            )
        return found

    @property
    def thumbnails(self) -> int:
        """How many distinct images the page embeds."""
        return sum(uri is not None for uri, _ in self._thumbs.values())

    def json(self, stage: str, name: str) -> dict:
        return _damaged(self.path(stage, name), lambda p: json.loads(p.read_text(encoding="utf-8")))

    def csv(self, stage: str, name: str) -> pd.DataFrame:
        return _damaged(self.path(stage, name), lambda p: pd.read_csv(p, keep_default_na=False))

    def parquet(self, stage: str, name: str) -> pd.DataFrame:
        return _damaged(self.path(stage, name), pd.read_parquet)

    def link(self, stage: str, name: str) -> str:
        """The relative address of a stage output from artifacts/report/index.html."""
        rel = self.path(stage, name).relative_to(self.artifacts)
        return "../" + "/".join(quote(part) for part in rel.parts)


def _damaged(path: Path, read: Callable):
    try:
        return read(path)
    except Exception as exc:  # truncated, not JSON, foreign: the section says so
        raise Missing(f"{path.name} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None


def build(run: Run) -> str:
    """The whole page as one HTML string."""
    started = time.time()
    parts = [_failure(run)] if run.failed else []
    for sid, title, _stage in SECTIONS:
        try:
            body = BUILDERS[sid](run)
        except Missing as why:
            body = f'<p class="skip">{escape(str(why))}</p>'
        except Exception as exc:  # an output of an unexpected shape costs its section, not the page
            body = para(f"could not be shown: {type(exc).__name__}: {str(exc)[:200]}", "warn")
        parts.append(f'<section id="{sid}"><h2>{escape(title)}</h2>\n{body}\n</section>')
    toc = " · ".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in SECTIONS)
    status = f"FAILED at stage {run.failed}" if run.failed else "completed"
    took = time.time() - started
    return PAGE.format(
        css=CSS,
        status=escape(status),
        cls="failed" if run.failed else "ok",
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        data=escape(str(run.data_dir)),
        toc=toc,
        body="\n".join(parts),
        took=f"{took:.1f}",
    )


# --- pieces -------------------------------------------------------------------------------------


def thumb(run: Run, rel: str, caption: str, reason: str | None = None) -> str:
    """A figure with the image at `rel` (under the data folder) as a bounded JPEG, or a placeholder
    with why it cannot be shown (`reason` given: the file is known not to decode; it is not read)."""
    if rel not in run._thumbs:
        run._thumbs[rel] = _encode(run.data_dir / rel) if reason is None else (None, reason)
    uri, why = run._thumbs[rel]
    cap = f"<figcaption><code>{escape(rel)}</code><br>{caption}</figcaption>"
    if uri is None:
        return f'<figure class="t"><div class="ph">cannot show: {escape(why)}</div>{cap}</figure>'
    return f'<figure class="t"><img src="{uri}" alt="{escape(rel)}">{cap}</figure>'


def _encode(path: Path) -> tuple[str | None, str | None]:
    from headstart.preprocess import decode

    try:
        img = decode(path, keep_grey=True)
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except Exception as exc:  # unreadable, refused, vanished: a placeholder says why
        return None, f"{type(exc).__name__}: {str(exc)[:160]}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def gallery(figures: list[str], total: int, more: str = "") -> str:
    rest = total - len(figures)
    tail = f'<p class="more">{rest} more not shown{escape(more)}</p>' if rest > 0 else ""
    return f'<div class="g">{"".join(figures)}</div>{tail}'


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a table of their plain values (nested values are left out)."""
    if not rows:
        return '<p class="skip">none</p>'
    columns = columns or [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return "" if v is None else str(v)


def para(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"


def _failure(run: Run) -> str:
    return (
        f'<section id="failure"><h2>Failed at stage {escape(run.failed or "")}</h2>'
        f'<pre class="error">{escape(run.error or "no error recorded")}</pre>'
        f"<p>Sections after stage {escape(run.failed or '')} are not shown: that stage did not finish.</p>"
        "</section>"
    )


# --- sections -----------------------------------------------------------------------------------


def _data(run: Run) -> str:
    rep = run.json("prepare", "report.json")
    classes, counts = rep.get("classes", []), rep.get("split_counts", {})
    splits = ("train", "val", "test")
    rows = [{"class": c, **{s: counts.get(s, {}).get(c, 0) for s in splits}} | {"total": 0} for c in classes]
    for r in rows:
        r["total"] = sum(r[s] for s in splits)
    out = [
        para(
            f"{rep.get('n_files', '?')} files in {rep.get('data_dir', '?')}: {rep.get('n_images', '?')} "
            f"readable images, {rep.get('n_unreadable', 0)} unreadable; data hash "
            f"{str(rep.get('data_hash', ''))[:12]}."
        ),
        table(rows, ["class", *splits, "total"]),
    ]
    if len(classes) < 2:
        found = f" ({', '.join(classes)})" if classes else ""
        out.append(
            para(
                f"Only {len(classes)} class{found}: a classifier needs at least two class folders, "
                "each with its images.",
                "warn",
            )
        )
    if not sum(counts.get("test", {}).values()):
        out.append(
            para(
                "No test images: there is nothing to measure the model on; add images or raise "
                "prepare.test_fraction.",
                "warn",
            )
        )
    out.append(_examples(run))
    return "\n".join(out)


def _examples(run: Run) -> str:
    try:
        m = run.parquet("validate", "manifest.parquet")
    except Missing:
        m = run.parquet("prepare", "manifest.parquet")
        m = m[m["readable"]]
    n, per = LIMITS["example_classes"], LIMITS["examples"]
    labels = sorted(m["label"].unique())
    figs = []
    for label in labels[:n]:
        rows = m[m["label"] == label].sort_values("sha256").head(per)  # a stable, spread sample
        figs += [thumb(run, r.path, f"{escape(label)} · {escape(str(r.split))}") for r in rows.itertuples()]
    more = "" if len(labels) <= n else f" ({len(labels) - n} classes without examples)"
    head = f"<h3>Examples ({per} per class)</h3>"
    return head + gallery(figs, len(figs)) + (para(more.strip(" ()") + ".", "more") if more else "")


def _quarantine(run: Run) -> str:
    q = run.csv("validate", "quarantine.csv")
    if q.empty:
        return para("No file was quarantined.")
    readable = _readable(run)
    figs = [
        thumb(run, r.path, escape(r.reason), None if readable.get(r.path, False) else r.reason)
        for r in q.head(LIMITS["quarantine"]).itertuples()
    ]
    csv = run.link("validate", "quarantine.csv")
    return (
        para(f"{len(q)} files are not trained on; each with its reason.")
        + gallery(figs, len(q), "; every file and reason: quarantine.csv")
        + f'<p><a href="{csv}">quarantine.csv</a></p>'
    )


def _readable(run: Run) -> dict[str, bool]:
    """Which files decoded when prepare scanned them: the others are shown as placeholders, unread."""
    try:
        m = run.parquet("prepare", "manifest.parquet")
    except Missing:
        return {}
    return dict(zip(m["path"], m["readable"].astype(bool), strict=True))


def _validation(run: Run) -> str:
    rep = run.json("validate", "report.json")
    verdict = "passed" if rep.get("success") else "FAILED: " + ", ".join(rep.get("failed", []))
    rows = [
        {
            "expectation": e.get("name"),
            "level": e.get("level"),
            "result": "ok" if e.get("success") else ("FAILED" if e.get("level") == "fail" else "warning"),
            "count": e.get("count"),
            "examples": "; ".join(e.get("examples", [])[:3]),
        }
        for e in rep.get("expectations", [])
    ]
    try:
        docs = (
            f'<p>Great Expectations Data Docs: <a href="{run.link("validate", "data_docs/index.html")}">'
            "data_docs/index.html</a></p>"
        )
    except Missing:
        docs = para("No Data Docs were written.", "skip")
    summary = f"Data validation {verdict}: {rep.get('n_images')} usable images of {rep.get('n_files')} files."
    return para(summary, "" if rep.get("success") else "warn") + table(rows) + docs


def _duplicates(run: Run) -> str:
    from headstart.validation import DUPLICATE_FLAGS

    found = {
        e.get("name"): e.get("count") for e in run.json("validate", "report.json").get("expectations", [])
    }
    if all(found.get(name) == 0 for name in DUPLICATE_FLAGS):  # the pass below costs seconds at 10,000
        return para("Validation found no exact or near-duplicate images across classes or splits.")
    p = run.validate or ValidateParams()
    pairs = duplicate_pairs(run.parquet("prepare", "manifest.parquet"), p)
    if not pairs:
        return para("No exact or near-duplicate images across classes or splits.")
    figs = [
        f'<div class="pair"><p>{escape(kind)}</p>{thumb(run, a, "")}{thumb(run, b, "")}</div>'
        for a, b, kind in pairs[: LIMITS["pairs"]]
    ]
    return para(
        f"{len(pairs)} pairs of the same or nearly the same image in different classes or splits "
        f"(perceptual-hash distance <= {p.near_duplicate_distance}): one class's image in another "
        "teaches the model a contradiction; one split's in another inflates the test score."
    ) + gallery(figs, len(pairs))


def duplicate_pairs(manifest: pd.DataFrame, p: ValidateParams) -> list[tuple[str, str, str]]:
    """(path, its duplicate, what kind) for each pair validation flags, each pair once, cross-class first."""
    from headstart.validation import flag_files

    flagged = flag_files(manifest, p)
    names = {
        "dup_across_classes": "same content, different classes",
        "near_dup_across_classes": "near-duplicates, different classes",
        "dup_across_splits": "same content, different splits",
        "near_dup_across_splits": "near-duplicates, different splits",
    }
    seen, out = set(), []
    for flag in names:  # validation.DUPLICATE_FLAGS' columns, worst first
        for r in flagged[flagged[flag] & (flagged["duplicate_of"] != "")].itertuples():
            key = frozenset((r.path, r.duplicate_of))
            if key not in seen:
                seen.add(key)
                out.append((r.path, r.duplicate_of, names[flag]))
    return out


def _backbone(run: Run) -> str:
    d = run.json("backbone", "decision.json")
    out = para(f"{d.get('chosen')} ({d.get('how')}): {d.get('reason')}")
    return out + (table(d["candidates"]) if d.get("candidates") else "")


def _domain(run: Run) -> str:
    r = run.json("domain", "report.json")
    t = r.get("thresholds", {})
    out = [
        para(
            f"Verdict: {r.get('verdict')} (score {r.get('score')}; shifted at {t.get('shifted_at')}, "
            f"mismatch at {t.get('mismatch_at')}) for {r.get('backbone')} on {r.get('n_images')} training "
            f"images; on mismatch: {r.get('on_mismatch')}.",
            "" if r.get("verdict") != "mismatch" else "warn",
        ),
    ]
    try:
        out.append(png(run.path("domain", "profile.png"), "per-layer BatchNorm divergence"))
    except Missing as why:
        out.append(para(str(why), "skip"))
    far = r.get("furthest")
    if far is None:
        out.append(para("This domain report records no per-image scores.", "skip"))
    else:
        figs = [thumb(run, f["path"], f"divergence {f['divergence']:.3g}") for f in far[: LIMITS["furthest"]]]
        out.append("<h3>Furthest from the pretraining data</h3>" + gallery(figs, len(figs)))
    return "\n".join(out)


def _training(run: Run) -> str:
    m = run.json("train_head", "metrics.json")
    out = [
        para(
            f"Head on {m.get('n_train')} training images: best epoch {m.get('best_epoch')} of "
            f"{m.get('epochs_run')}, validation accuracy {_fmt(m.get('val_accuracy'))}, "
            f"features by {m.get('runtime')}."
        )
    ]
    try:
        out.append(para(run.json("train_head", "search.json").get("line", "")))
    except Missing:
        pass
    curves = {"head": run.json("train_head", "history.json")}
    for stage, name in (("finetune", "fine-tuned"), ("scratch", "from scratch")):
        try:
            curves[name] = run.json(stage, "history.json")
        except Missing:
            pass
    if any(curves.values()):
        png = base64.b64encode(drawn("training_curves", curves)).decode("ascii")
        out.append(f'<img class="plot" src="data:image/png;base64,{png}" alt="training curves">')
    return "\n".join(out)


def _decision(stage: str, key: str) -> Callable[[Run], str]:
    def section(run: Run) -> str:
        d = run.json(stage, "decision.json")
        out = para(f"{'yes' if d.get(key) else 'no'}: {d.get('reason')}")
        gate = d.get("gate")
        return out + (table([gate]) if isinstance(gate, dict) else "")

    return section


def _select(run: Run) -> str:
    d = run.json("select", "decision.json")
    return para(f"Chosen: {d.get('chosen')} ({d.get('kind')}): {d.get('reason')}") + table(
        d.get("candidates", [])
    )


def _test(run: Run) -> str:
    m = run.json("evaluate", "metrics.json")
    ci = m.get("accuracy_ci")
    out = [
        para(
            f"Accuracy {_fmt(m.get('accuracy'))}"
            + (f" ({_fmt(ci)})" if ci else "")
            + f", macro-F1 {_fmt(m.get('macro_f1'))} on {m.get('n')} test images ({m.get('model_kind')})."
        ),
        table([{"class": c, **v} for c, v in m.get("per_class", {}).items()]),
        *_estimates(m),
    ]
    gain = m.get("transfer_gain") or {}
    if gain:
        out.append(
            para("Transfer gain: " + (gain["why_not"] if "why_not" in gain else json.dumps(gain)[:400]))
        )
    try:
        out.append(png(run.path("evaluate", "confusion.png"), "confusion matrix"))
    except Missing as why:
        out.append(para(str(why), "skip"))
    p = run.csv("evaluate", "predictions.csv")
    wrong = p[p["actual"].astype(str) != p["predicted"].astype(str)].sort_values(
        "confidence", ascending=False
    )
    figs = [
        thumb(
            run,
            r.path,
            f"true <b>{escape(str(r.actual))}</b> → {escape(str(r.predicted))} ({r.confidence:.2f})",
        )
        for r in wrong.head(LIMITS["misclassified"]).itertuples()
    ]
    head = f"<h3>Misclassified ({len(wrong)} of {len(p)}), most confident first</h3>"
    out.append(head + (gallery(figs, len(wrong)) if len(wrong) else para("none")))
    return "\n".join(out)


def _estimates(m: dict) -> list[str]:
    """Both accuracies with their n and CI, which one the gates use, and the signal verdict."""
    if not m.get("signal"):
        return []
    rows = [
        {
            "estimate": name.replace("_", "-"),
            "accuracy": e["accuracy"],
            "CI": e["accuracy_ci"],
            "images": e["n"],
            "largest class": e["majority_rate"],
            "the gates use it": "yes" if name == m["estimate"] else "",
        }
        for name, e in m["estimates"].items()
        if e
    ]
    verdict = "Learned something" if m["signal"]["passed"] else "No signal"
    return [table(rows), para(f"{verdict}: {m['signal']['line']}.", "" if m["signal"]["passed"] else "error")]


def _abstention(run: Run) -> str:
    a = run.json("calibrate", "abstention.json")
    rep, rule = a.get("report", {}), a.get("rule", {})
    held = rep.get("held_out", {})
    out = [
        para(
            f"Temperature {_fmt(rule.get('temperature'))}, alpha {_fmt(rule.get('alpha'))}; on "
            f"{rep.get('n')} held-out images: abstains on {_fmt(held.get('abstention_rate'))}, accuracy on "
            f"the rest {_fmt(held.get('selective_accuracy'))}. {rep.get('source', '')}"
        )
    ]
    try:
        test = run.json("evaluate", "metrics.json").get("abstention") or {}
        p = run.csv("evaluate", "predictions.csv")
    except Missing as why:
        return "\n".join([*out, para(f"On the test split: {why}", "skip")])
    out.append(
        para(
            f"On the test split: abstains on {_fmt(test.get('abstention_rate'))} "
            f"({_fmt(test.get('abstention_by_reason'))}), accuracy on the rest "
            f"{_fmt(test.get('selective_accuracy'))}."
        )
    )
    if "abstained" not in p:
        return "\n".join([*out, para("This run's predictions.csv records no per-image abstentions.", "skip")])
    held_back = p[p["abstained"].astype(str) != ""]
    figs = [
        thumb(
            run,
            r.path,
            f"{escape(str(r.abstained))}: true {escape(str(r.actual))}, "
            f"argmax {escape(str(r.predicted))} ({r.confidence:.2f})",
        )
        for r in held_back.head(LIMITS["abstained"]).itertuples()
    ]
    out.append(f"<h3>Abstained test images ({len(held_back)})</h3>" + gallery(figs, len(held_back)))
    return "\n".join(out)


def _export(run: Run) -> str:
    p = run.json("export", "parity.json")
    rows = [
        {"variant": name, "registered": name in p.get("registered", []), **v}
        for name, v in p.get("variants", {}).items()
    ]
    cols = [
        "variant",
        "passed",
        "registered",
        "top1_agreement",
        "max_abs_logit_diff",
        "accuracy_torch",
        "n_images",
        "failures",
    ]
    head = para(f"Parity {'passed' if p.get('passed') else 'FAILED'}; {p.get('build', '')}")
    return head + table(rows, cols)


def _promotion(run: Run) -> str:
    out = []
    try:
        r = run.json("register", "run.json")
        out.append(
            para(
                f"MLflow run {r.get('run_id')} ({r.get('tracking_uri')}); model {r.get('model_uri')}"
                + ("" if r.get("registered", True) else f": {r.get('reason')}")
            )
        )
    except Missing as why:
        out.append(para(f"register: {why}", "skip"))
    d = run.json("promote", "decision.json")
    verdict = "champion" if d.get("promoted") else "challenger"
    out.append(para(f"Version {d.get('version')} -> {verdict}: {d.get('reason')}"))
    gates = [{"gate": k, **v} for k, v in (d.get("gates") or {}).items() if isinstance(v, dict)]
    return "\n".join([*out, table(gates)])


BUILDERS: dict[str, Callable[[Run], str]] = {
    "data": _data,
    "quarantine": _quarantine,
    "validation": _validation,
    "duplicates": _duplicates,
    "backbone": _backbone,
    "domain": _domain,
    "training": _training,
    "finetune": _decision("finetune", "finetuned"),
    "scratch": _decision("scratch", "ran"),
    "select": _select,
    "test": _test,
    "abstention": _abstention,
    "export": _export,
    "promotion": _promotion,
}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em;color:#222}
h1{margin:.2em 0} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.ok{color:#176b2c} .failed,.warn{color:#a3120b} .skip,.more{color:#777;font-style:italic}
table{border-collapse:collapse;margin:.5em 0;font-size:13px} td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f3f3f3;text-align:left} .g{display:flex;flex-wrap:wrap;gap:8px}
figure.t{margin:0;width:120px;font-size:11px;overflow-wrap:anywhere}
figure.t img{display:block;max-width:96px;max-height:96px;border:1px solid #ccc}
.ph{width:96px;height:96px;background:#eee;border:1px dashed #999;font-size:10px;overflow:hidden}
.pair{display:flex;gap:4px;border:1px solid #ddd;padding:4px} .pair p{width:70px;font-size:11px;margin:0}
img.plot{max-width:100%} pre.error{background:#fff0f0;padding:.6em;white-space:pre-wrap}
nav{font-size:13px}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>headstart run report</title><style>{css}</style></head>
<body>
<header id="summary"><h1>headstart run report: <span class="{cls}">{status}</span></h1>
<p>Data {data}; written {when} in {took} s. Self-contained: no network requests.</p>
<nav>{toc}</nav></header>
{body}
</body></html>
"""
