"""Image-level data validation: a Great Expectations suite over the manifest, with a quarantine.

The manifest (one row per file, from data.manifest.scan) is turned into four small tables, each
validated by its own GX suite: `files` (every file found), `images` (the usable ones), `counts`
(images per class and split) and `balance` (images per class). Every expectation has a level from
params: `fail` stops the pipeline before training, `warn` is recorded. Files that cannot or must not
be trained on go to the quarantine with a reason; nothing in the user's folder is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from headstart import GateFailed
from headstart.config import ValidateParams
from headstart.data.inspection import hamming
from headstart.data.manifest import OUTSIDE, SPLITS, class_labels
from headstart.datadocs import make_offline

DUPLICATE_FLAGS = {
    "no_duplicates_across_splits": "dup_across_splits",
    "no_near_duplicates_across_splits": "near_dup_across_splits",
    "no_duplicates_across_classes": "dup_across_classes",
    "no_near_duplicates_across_classes": "near_dup_across_classes",
}


class ValidationFailed(GateFailed):
    """A `fail`-level expectation failed: the pipeline stops before training."""


@dataclass
class Validation:
    report: dict  # success, counts, one entry per expectation (level, success, count, examples)
    quarantine: pd.DataFrame  # path, reason
    clean: pd.DataFrame  # the manifest rows that later stages use


def validate_manifest(
    manifest: pd.DataFrame,
    p: ValidateParams,
    docs_dir: Path | None,
) -> Validation:
    """Flag, quarantine, run the suites; Data Docs HTML into docs_dir when given. The splits stay
    prepare's: each image's split is its own (assign_splits), so quarantining one moves no other."""
    files = flag_files(manifest, p)
    quarantine = quarantine_reasons(files, p)
    clean = files[files["readable"] & ~files["path"].isin(quarantine["path"])].copy()
    tables = {"files": files, "images": clean, **class_tables(clean, p, class_labels(files))}
    results = run_suites(tables, expectations(p), docs_dir, p.max_examples)
    failed = [r["name"] for r in results if not r["success"] and r["level"] == "fail"]
    report = {
        "success": not failed,
        "failed": failed,
        "warnings": [r["name"] for r in results if not r["success"] and r["level"] == "warn"],
        "n_files": len(files),
        "n_images": len(clean),
        "n_quarantined": len(quarantine),
        "expectations": results,
    }
    return Validation(report, quarantine, clean[manifest.columns].reset_index(drop=True))


def flag_files(manifest: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """The manifest plus one boolean column per row-level check that GX cannot compute itself."""
    m = manifest.reset_index(drop=True).copy()
    m["inside_root"] = ~m["reason"].str.startswith(OUTSIDE)
    for col in [*DUPLICATE_FLAGS.values(), "duplicate_of"]:
        m[col] = "" if col == "duplicate_of" else False
    ok = m.index[m["readable"]]
    for _, group in m.loc[ok].groupby("sha256"):
        if len(group) > 1:
            m.loc[group.index, "dup_across_splits"] = group["split"].nunique() > 1
            m.loc[group.index, "dup_across_classes"] = group["label"].nunique() > 1
            for i in group.index:
                m.at[i, "duplicate_of"] = next(x for x in group["path"] if x != m.at[i, "path"])
    _near_duplicates(m, ok, p.near_duplicate_distance)
    return m


def _near_duplicates(m: pd.DataFrame, ok: pd.Index, k: int, block: int = 1024) -> None:
    """Perceptual-hash neighbours (distance <= k, different bytes) in another split or class."""
    h = np.array([int(x, 16) for x in m.loc[ok, "phash"]], dtype=np.uint64)
    sha, split, label = (m.loc[ok, c].to_numpy() for c in ("sha256", "split", "label"))
    for start in range(0, len(h), block):
        rows = slice(start, start + block)
        near = (hamming(h[rows], h) <= k) & (sha[rows, None] != sha[None, :])
        for flag, values in (("near_dup_across_splits", split), ("near_dup_across_classes", label)):
            hit = near & (values[rows, None] != values[None, :])
            for i in np.flatnonzero(hit.any(1)):
                row = ok[start + i]
                m.at[row, flag] = True
                if not m.at[row, "duplicate_of"]:
                    m.at[row, "duplicate_of"] = m.at[ok[np.flatnonzero(hit[i])[0]], "path"]


def quarantine_reasons(files: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """Every file that will not be trained on, with the first reason that applies."""
    lo, hi = p.min_size, p.max_size
    rules = [
        (~files["readable"], files["reason"]),
        (~files["format"].isin(p.formats), "format " + files["format"] + " not in validate.formats"),
        (~files["mode"].isin(p.modes), "mode " + files["mode"] + " not in validate.modes"),
        (
            ~files["width"].between(lo, hi) | ~files["height"].between(lo, hi),
            "size "
            + files["width"].astype(str)
            + "x"
            + files["height"].astype(str)
            + f" outside validate.min_size..max_size ({lo}..{hi})",
        ),
        (files["dup_across_classes"], "same content in another class: " + files["duplicate_of"]),
    ]
    reason = pd.Series("", index=files.index, dtype=object)
    for mask, text in reversed(rules):  # the first rule that applies wins
        reason = reason.mask(mask, text)
    out = files.loc[reason != "", ["path"]].assign(reason=reason[reason != ""])
    return out.reset_index(drop=True)


def class_tables(
    clean: pd.DataFrame, p: ValidateParams, classes: list[str] | None = None
) -> dict[str, pd.DataFrame]:
    """Images per class (split `all`: validate.min_per_class) and per (class, split) against
    validate.min_per_split, and each class's imbalance ratio. `classes`
    (manifest.class_labels) adds the class folders left with no usable image, so they fail by name."""
    labels = sorted(set(clean["label"]) | set(classes or []))
    counts = (
        clean.groupby(["label", "split"])
        .size()
        .reindex(pd.MultiIndex.from_product([labels, SPLITS], names=["label", "split"]), fill_value=0)
        .rename("n")
        .reset_index()
    )
    counts["min_required"] = counts["split"].map(p.min_per_split.model_dump())
    totals = clean.groupby("label").size().reindex(labels, fill_value=0).rename("n").rename_axis("label")
    totals = totals.reset_index()
    every = totals.assign(split="all", min_required=p.min_per_class)  # the class as a whole
    counts = pd.concat([every[counts.columns], counts], ignore_index=True)
    totals["ratio"] = totals["n"].max() / totals["n"] if len(totals) else []
    return {"counts": counts, "balance": totals}


def expectations(p: ValidateParams) -> list[tuple[str, str, object]]:
    """(name, table, GX expectation) for every check; the names are the keys of validate.levels."""
    import great_expectations.expectations as gxe

    readable = {"row_condition": "readable==True", "condition_parser": "pandas"}
    out = [
        (
            "every_file_is_a_readable_image",
            "files",
            gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        ),
        ("no_empty_files", "files", gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1)),
        (
            "paths_inside_data_root",
            "files",
            gxe.ExpectColumnValuesToBeInSet(column="inside_root", value_set=[True]),
        ),
        (
            "format_allowed",
            "files",
            gxe.ExpectColumnValuesToBeInSet(column="format", value_set=p.formats, **readable),
        ),
        (
            "mode_allowed",
            "files",
            gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=p.modes, **readable),
        ),
        (
            "width_in_bounds",
            "files",
            gxe.ExpectColumnValuesToBeBetween(
                column="width", min_value=p.min_size, max_value=p.max_size, **readable
            ),
        ),
        (
            "height_in_bounds",
            "files",
            gxe.ExpectColumnValuesToBeBetween(
                column="height", min_value=p.min_size, max_value=p.max_size, **readable
            ),
        ),
        *[
            (name, "files", gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[False]))
            for name, col in DUPLICATE_FLAGS.items()
        ],
        (
            "enough_classes",
            "images",
            gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=p.min_classes),
        ),
        (
            "min_per_class_per_split",
            "counts",
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="n", column_B="min_required", or_equal=True),
        ),
        (
            "imbalance_below_warn_ratio",
            "balance",
            gxe.ExpectColumnValuesToBeBetween(column="ratio", max_value=p.imbalance_warn_ratio),
        ),
        (
            "imbalance_below_fail_ratio",
            "balance",
            gxe.ExpectColumnValuesToBeBetween(column="ratio", max_value=p.imbalance_fail_ratio),
        ),
    ]
    if p.classes is not None:
        out.append(
            (
                "labels_as_declared",
                "images",
                gxe.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=p.classes),
            )
        )
    levels = p.levels.model_dump()
    for name, _, expectation in out:
        expectation.meta = {"headstart_name": name, "level": levels[name]}
    return out


def run_suites(
    tables: dict[str, pd.DataFrame], checks: list, docs_dir: Path | None, max_examples: int = 5
) -> list[dict]:
    """One GX suite per table in an ephemeral context; results summarised with examples."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="headstart",
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            },
        )
    source = ctx.data_sources.add_pandas("headstart")
    results = []
    for table, frame in tables.items():
        exps = [e for _, t, e in checks if t == table]
        if not exps:
            continue
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"headstart_{table}", expectations=exps))
        run = ctx.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        frame = frame.reset_index(drop=True)
        outcome = run.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
        results += [_summarise(r, table, frame, max_examples) for r in outcome.results]
    if docs_dir is not None:
        ctx.build_data_docs(site_names=["headstart"])
        make_offline(docs_dir)  # GX's pages load their CSS/JS from CDNs: a closed network shows none
    order = [name for name, _, _ in checks]
    return sorted(results, key=lambda r: order.index(r["name"]))


def _summarise(r, table: str, frame: pd.DataFrame, max_examples: int = 5) -> dict:
    meta = r.expectation_config.meta
    res = r.result or {}
    index = res.get("unexpected_index_list") or []
    out = {
        "name": meta["headstart_name"],
        "level": meta["level"],
        "success": bool(r.success),
        "table": table,
        "expectation": r.expectation_config.type,
        "count": int(res.get("unexpected_count") or (0 if r.success else 1)),
        "examples": [_describe(frame, table, i) for i in index[:max_examples]],
    }
    out["per_row"] = "unexpected_count" in res  # else it checks the whole table: no rows to count
    if table == "images" and out["name"] in _CLASS_CHECKS:
        out["classes"] = sorted(frame["label"].unique())
        out["min"] = r.expectation_config.kwargs.get("min_value")
    if not index:  # set-level expectations name values, not rows
        values = [f"unexpected {v}" for v in res.get("partial_unexpected_list") or []]
        values += [f"missing {v}" for v in res.get("partial_missing_list") or []]
        out["examples"] = values[:max_examples]
    if res.get("observed_value") is not None:
        out["observed"] = _plain(res["observed_value"])
    if r.exception_info and r.exception_info.get("raised_exception"):
        out["error"] = r.exception_info.get("exception_message")
    return out


def _describe(frame: pd.DataFrame, table: str, i) -> str:
    row = frame.loc[i]
    if table == "counts":
        return f"{row['label']}/{row['split']}: {row['n']} images (min {row['min_required']})"
    if table == "balance":
        return f"{row['label']}: {row['n']} images (largest class / this = {row['ratio']:.1f})"
    partner = row.get("duplicate_of", "")
    return f"{row['path']} ~ {partner}" if partner else str(row["path"])


def _plain(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(str(v) for v in value)
    return value.item() if hasattr(value, "item") else value


def failure_message(report: dict, report_path: Path) -> str:
    """One line naming each failed expectation, its count and examples."""
    parts = [_explain(r) for r in report["expectations"] if not r["success"] and r["level"] == "fail"]
    return f"data validation failed: {' | '.join(parts)}; see {report_path}"


_CLASS_CHECKS = ("enough_classes", "labels_as_declared")


def _explain(r: dict) -> str:
    """One failed expectation in words: rows counted where it checks rows, what was found where it
    checks the whole table (a class count is no 'unexpected' row)."""
    examples = f" (e.g. {'; '.join(r['examples'][:3])})" if r["examples"] else ""
    if r["name"] == "enough_classes" and "classes" in r:
        found = r["classes"]
        names = f" ({', '.join(found)})" if found else ""
        return (
            f"enough_classes: found {len(found)} class{'' if len(found) == 1 else 'es'}{names}; "
            f"need at least {r['min']}: put each class's images in its own folder"
        )
    if not r.get("per_row", True):
        if "classes" in r:
            found = ", ".join(r["classes"])
            return f"{r['name']}: the classes found ({found}) differ from validate.classes{examples}"
        return f"{r['name']}: observed {r.get('observed')}{examples}"
    seen = f", observed {r['observed']}" if "observed" in r else ""
    return f"{r['name']}: {r['count']} unexpected{seen}{examples}"


def to_markdown(report: dict) -> str:
    """The validation summary for a Prefect artifact and the MLflow run."""
    verdict = "passed" if report["success"] else "FAILED: " + ", ".join(report["failed"])
    lines = [
        f"# Data validation {verdict}",
        "",
        f"{report['n_files']} files, {report['n_images']} usable images, "
        f"{report['n_quarantined']} quarantined.",
        "",
        "| expectation | level | result | count | examples |",
        "|---|---|---|---|---|",
    ]
    for r in report["expectations"]:
        result = "ok" if r["success"] else ("FAILED" if r["level"] == "fail" else "warning")
        examples = "; ".join(r["examples"][:3]).replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['level']} | {result} | {r['count']} | {examples} |")
    return "\n".join(lines) + "\n"
