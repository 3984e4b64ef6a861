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
