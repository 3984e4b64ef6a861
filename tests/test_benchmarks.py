"""The benchmarks are not timed tests, but they must keep running: a tiny run of each piece."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def test_manifest_benchmark_reports_rates():
    from benchmarks.manifest import run

    result = run("40x32")
    assert result["images"] == 40 and result["validation_success"]
    assert result["scan_cold_images_per_s"] > 0 and result["scan_warm_images_per_s"] > 0


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="GNU time is not installed here")
def test_measured_reads_wall_time_and_peak_memory():
    from benchmarks.features import measured

    small = measured([sys.executable, "-c", "pass"])
    big = measured([sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert small["s"] > 0 and big["peak_rss_mb"] >= small["peak_rss_mb"] + 250


@pytest.mark.pretrained
def test_finetune_benchmark_reports_both_models(tmp_path):
    from benchmarks.finetune import run

    # 16 per class: the smallest elpv `type` sample whose classes each draw a val image by hash
    result = run("type", 16, tmp_path / "run", tmp_path / "cache", "cpu", ["finetune.max_epochs=2"])
    assert result["n_train"] >= 10 and not result["default_gate_open"]
    assert 0 <= result["test_accuracy_head"] <= 1 and 0 <= result["val_accuracy_finetuned"] <= 1
    assert result["wall_s"]["finetune"] > 0 and result["finetune_epochs"] <= 2


@pytest.mark.pretrained
def test_runtime_benchmark_reports_torch_and_onnxruntime():
    from benchmarks.runtime import run

    report = run(n_images=6, repeats=2)
    for bs in ("1", "32"):
        row = report["batch"][bs]
        assert row["torch_eager_cpu"]["images_per_s"] > 0 and row["onnxruntime_cpu"]["p95_ms"] > 0
    assert report["predict_folder"]["predicted"] == 6


def test_transfer_benchmark_draws_learning_curves(tmp_path, tiny_weights):
    """digits only, 5 per class, 1 seed, 1 scratch epoch, the tiny backbone: every candidate is
    scored on the same test images, timed, and plotted."""
    from benchmarks.transfer import Settings, crossing, markdown, plot, run_dataset
    from headstart.config import TrainHeadParams
    from tests.conftest import TINY_BACKBONE

    th = TrainHeadParams(
        backbone=TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1], max_epochs=3
    )
    s = Settings(sizes=(5,), seeds=1, test_per_class=3, finetune=True, scratch_epochs=1)
    run = run_dataset("digits", tmp_path, s, "cpu", th)
    assert (
        run["images"] == 1797 and run["test_images"] == 30 and run["classes"] == [str(d) for d in range(10)]
    )
    methods = {p["method"]: p for p in run["points"] if p["per_class"] == 5}
    assert "min_train_images" in methods["finetuned"]["skipped"]  # 50 images: the gate stays shut
    for m in ("head_only", "scratch"):
        assert 0 <= methods[m]["test_accuracy"] <= 1 and methods[m]["wall_s"] > 0
        assert methods[m]["peak_rss_mb"] > 100 and methods[m]["n_train"] == 50
    assert methods["scratch"]["epochs"] == 1 and methods["scratch"]["input"] == "32px x1"
    assert run["feature_extraction"]["images"] >= 30 + 10 * 7
    assert set(run["crossing"]["scratch_minus_best_transfer"]) == set(run["sizes"])
    report = {"mode": "test", "datasets": [run]}
    assert plot(report, tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| digits | 5 |" in markdown(report)
    summary = {"head_only": {5: {"test_accuracy": 0.9}, 50: {"test_accuracy": 0.9}},
               "scratch": {5: {"test_accuracy": 0.5}, 50: {"test_accuracy": 0.95}}}  # fmt: skip
    assert crossing(summary)["scratch_overtakes_at_per_class"] == 50


def test_transfer_benchmark_caps_sizes_by_what_each_class_has():
    import pandas as pd

    from benchmarks.transfer import Settings, plan

    frame = pd.DataFrame({"label": ["a"] * 40 + ["b"] * 100, "sha256": [f"{i:03d}" for i in range(140)]})
    test, pool, sizes = plan(frame, Settings(sizes=(5, 10, 20, 50), test_per_class=100))
    assert test["label"].value_counts().to_dict() == {"a": 10, "b": 10}  # a quarter of the smallest
    assert sizes == [5, 10, 20, 24]  # a has 30 left: 50 + 13 val do not fit; 24 + 6, the largest that does
    assert set(test.index).isdisjoint(pool.index) and len(pool) == 120


def test_transfer_reports_run_apart_combine_into_one_and_refuse_a_doubled_data_set(tmp_path):
    """Each data set can run in its own process (or machine); --combine assembles their reports."""
    import json

    import pytest

    from benchmarks.transfer import main

    def report(name: str, wall: float) -> dict:
        summary = {
            m: {5: {"test_accuracy": 0.5, "std": 0.0, "wall_s": 1.0}} for m in ("head_only", "scratch")
        }
        run = {"dataset": name, "sizes": [5], "summary": summary}
        return {"mode": "full", "settings": {"seeds": 3, "sizes": [5]}, "datasets": [run], "wall_s": wall}

    files = []
    for name, wall in (("lfw", 10.0), ("digits", 32.5)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(report(name, wall)))
    out = main(["--combine", *map(str, files), "--markdown", str(tmp_path / "t.md")])
    assert [d["dataset"] for d in out["datasets"]] == ["lfw", "digits"] and out["wall_s"] == 42.5
    assert out["settings"] == {"seeds": 3, "sizes": {"lfw": [5], "digits": [5]}}
    assert "| lfw | 5 | 0.500 | - | 0.500 |" in (tmp_path / "t.md").read_text()  # sizes read back as numbers
    with pytest.raises(SystemExit, match="appears twice"):
        main(["--combine", str(files[0]), str(files[0])])
    other = report("elpv-type", 1.0) | {"settings": {"seeds": 1}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different"):
        main(["--combine", str(files[0]), str(tmp_path / "other.json")])


def test_serving_benchmark_load_and_memory_readings():
    import os

    from benchmarks.serving import group_rss_mb, load

    calls = []
    result = load(calls.append, [b"a", b"b"], clients=3, requests_each=4)
    assert len(calls) == result["requests"] == 12 and sorted(set(calls)) == [b"a", b"b"]
    assert 0 <= result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] and result["images_per_s"] > 0
    assert group_rss_mb(os.getpgrp()) > 10  # this process at least


def test_quality_benchmark_scores_default_searched_and_views_heads(tmp_path, tiny_weights):
    """digits-20 with the tiny backbone, 1 seed, 2 trials: the pipeline's splits, each method's test
    accuracy with its CI, the search's CV estimate only where it searched, views only where asked."""
    from benchmarks.quality import Settings, markdown, run_dataset
    from headstart.config import TrainHeadParams
    from tests.conftest import TINY_BACKBONE

    th = TrainHeadParams(
        backbone=TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1], max_epochs=4
    )
    run = run_dataset("digits-20", tmp_path / "data", tmp_path / "features", Settings(1, 1, 2), th)
    assert run["images"] == 200 and run["classes"] == [str(d) for d in range(10)]
    assert run["feature_extraction"]["computed"] == 200
    points = {p["method"]: p for p in run["points"]}
    assert list(points) == ["default", "searched", "searched+views"]
    for p in points.values():
        assert p["n_train"] + p["n_val"] + p["n_test"] == 200 and p["test_ci"][0] <= p["test_accuracy"]
        assert p["test_accuracy"] <= p["test_ci"][1] and p["head_s"] > 0
    assert points["default"]["search_mode"] == "off" and points["default"]["cv_accuracy"] is None
    assert points["searched"]["search_mode"] == "cv" and points["searched"]["trials"] == 2
    assert points["searched"]["views_computed"] == 0 and points["searched+views"]["views_computed"] > 0
    assert points["searched+views"]["views_s"] > 0
    assert "| digits-20 | 200 (" in markdown({"datasets": [run]})


def test_quality_summary_counts_seeds_helped_and_combines_reports(tmp_path):
    import json

    from benchmarks.quality import main, summarise

    def point(method: str, seed: int, acc: float) -> dict:
        return {"method": method, "seed": seed, "test_accuracy": acc, "macro_f1": acc, "cv_accuracy": None,
                "test_ci": [acc - 0.1, acc + 0.1], "n_test": 40, "head_s": 1.0, "views_s": 0.0, "trials": 20,
                "chosen": {"augment_views": 0}}  # fmt: skip

    points = [point("default", s, 0.8) for s in range(3)]
    points += [point("searched", s, a) for s, a in enumerate((0.9, 0.8, 0.75))]
    gain = summarise(points)["searched"]["gain_over_default"]
    assert gain == {"mean": round(0.05 / 3, 4), "helped": 1, "hurt": 1, "tied": 1}
    run = {"dataset": "lfw", "images": 200, "summary": summarise(points)}
    report = {"mode": "full", "settings": {"seeds": 3}, "datasets": [run], "wall_s": 5.0}
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "b.json").write_text(json.dumps(report | {"datasets": [run | {"dataset": "elpv-type"}]}))
    out = main(
        [
            "--combine",
            str(tmp_path / "b.json"),
            str(tmp_path / "a.json"),
            "--markdown",
            str(tmp_path / "t.md"),
        ]
    )
    assert [d["dataset"] for d in out["datasets"]] == ["elpv-type", "lfw"] and out["wall_s"] == 10.0
    assert (
        "| lfw | 200 (40) | 0.800 (0.000) | 0.817 (0.062) | +0.017 (1/1/1) | - |"
        in (tmp_path / "t.md").read_text()
    )
    with pytest.raises(SystemExit, match="appears twice"):
        main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "a.json")])


@pytest.mark.slow
@pytest.mark.pretrained
def test_scale_benchmark_compares_the_runners(tmp_path):
    """Lite0 on 6 tiny images: each runner's rate, the shard overhead, the features bit-identical."""
    from benchmarks.scale import report, table
    from tests.conftest import make_folder

    result = report(make_folder(tmp_path / "data", per_class=3), 0, workers=1, shard_size=4)
    assert result["images"] == 6 and result["bit_identical"]
    assert set(result["runners"]) == {"local", "process", "dask"}
    assert all(row["images_per_s"] > 0 for row in result["runners"].values())
    assert result["runners"]["dask"]["fixed_s"] > 0 and "| process |" in table(result)


def test_issue_18_table_reads_the_median_export_and_both_flows_peaks():
    """benchmarks.pipeline.goals: the export figure is the median of the warm runs (one sample moved
    by a second between benchmarks), the flow's peak the larger of the two flows', each against its
    goal."""
    from benchmarks.pipeline import goals

    def run(s, rss=100, tree=120):
        return {"s": s, "peak_rss_mb": rss, "peak_tree_rss_mb": tree}

    report = {
        "stages_warm": {"export": run(9.0)},
        "export_warm_repeats": [run(7.5), run(7.9)],
        "flow_warm": run(70.0, 1250, 1470),
        "flow_unchanged": run(15.0, 340, 560),
    }
    table = goals(report)
    assert table["export_stage_warm_s"]["today"] == 7.9 and table["export_stage_warm_s"]["met"]
    assert table["flow_peak_rss_mb"]["today"] == 1250 and table["flow_peak_rss_mb"]["met"]
    assert table["flow_peak_tree_rss_mb"]["today"] == 1470 and not table["flow_peak_tree_rss_mb"]["met"]
    assert table["flow_unchanged_s"]["today"] == 15.0
    del report["export_warm_repeats"]  # a report from before the repeats: its one warm run
    assert goals(report)["export_stage_warm_s"]["today"] == 9.0


def test_first_run_reads_each_stage_and_the_startup_from_the_flows_log():
    from datetime import datetime

    from benchmarks.first_run import markdown, summary

    started = datetime(2026, 12, 4, 15, 3, 20).timestamp()
    log = "\n".join(
        [
            "15:03:34.595 | INFO    | Flow run 'swift' - Beginning flow run 'swift'",
            "15:03:35.314 | INFO    | Task run 'prepare-efc' - Finished in state Completed()",
            "15:03:35.600 | INFO    | Flow run 'imperial-swift' - prepare: PrepareResult(n_files=80)",
            "15:03:43.627 | INFO    | Flow run 'imperial-swift' - validate runs: no record",
            "15:03:44.100 | INFO    | Flow run 'imperial-swift' - validate: ValidateResult(success=True)",
            "15:03:44.200 | INFO    | Flow run 'imperial-swift' - skipped: not a stage",
            "  promotion   v1 -> champion: the first model that passes every gate",
        ]
    )
    run = {
        "stdout": log,
        "stderr": "",
        "started": started,
        "s": 31.5,
        "peak_rss_mb": 900,
        "peak_tree_rss_mb": 1100,
    }
    s = summary(run)
    assert s["stages_s"] == {"startup": 14.6, "prepare": 1.0, "validate": 8.5}
    assert s["promotion"].startswith("v1 -> champion") and s["s"] == 31.5
    table = markdown({"cold": s, "new_project": s, "unchanged": s})
    assert "| **total s** | **31.5** |" in table and "| validate s | 8.5 | 8.5 | 8.5 |" in table
