"""Sharded extraction on real worker processes (headstart.shards): Prefect's process pool and a Dask
LocalCluster give the local path's features bit for bit, inside a flow and outside one; a worker
killed mid-shard, an unanswering Dask scheduler and an undecodable image end as they should."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from flows.shards import run
from headstart import HeadstartError
from headstart.atomic import write_bytes
from headstart.config import EngineParams
from headstart.features import Features, backbone_onnx
from headstart.preprocess import load_image
from headstart.shards import Job, split
from tests.conftest import scanned_images, tiny_backbone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return tiny_backbone(tiny_weights)


def _images(tmp_path, per_class=8):
    return scanned_images(tmp_path, per_class)


def _local(tiny, tmp_path, paths, shas):
    features = Features(tiny, "onnxruntime", tmp_path / "local_cache", batch_size=4)
    x, _ = features(paths, shas)
    return x, features.views(paths, shas, 1, seed=0)[0]


def test_process_and_dask_runners_give_the_local_features_bit_for_bit(tmp_path, tiny, prefect_harness):
    from prefect import flow

    paths, shas = _images(tmp_path)
    local, local_views = _local(tiny, tmp_path, paths, shas)

    def sharded(runner: str):
        p = EngineParams(runner=runner, workers=2, threads=1, shard_size=5)
        features = Features(
            tiny, "onnxruntime", tmp_path / f"{runner}_cache", batch_size=4, runner=p, run_shards=run
        )
        x, computed = features(paths, shas)
        return x, computed, features.views(paths, shas, 1, seed=0)[0]

    x, computed, views = sharded("process")  # outside a flow: `headstart stage` under dvc repro
    assert computed == len(paths)
    np.testing.assert_array_equal(x, local)
    np.testing.assert_array_equal(views, local_views)
    x, computed, views = flow(name="sharded")(sharded)("dask")  # inside one: `headstart run`
    assert computed == len(paths)
    np.testing.assert_array_equal(x, local)
    np.testing.assert_array_equal(views, local_views)


def dies_once(path, spec, flag: Path, victim: str):
    """Eval preprocessing; but the first time `victim` is loaded, the worker process is killed."""
    if Path(path).name == victim and not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return load_image(path, spec)


@pytest.mark.parametrize("runner", ["process", "dask"])
def test_a_worker_killed_mid_shard_is_retried_and_keeps_what_it_wrote(
    tmp_path, tiny, prefect_harness, runner
):
    paths, shas = _images(tmp_path, per_class=6)
    local, _ = _local(tiny, tmp_path, paths, shas)
    features = Features(tiny, "onnxruntime", tmp_path / "cache", batch_size=2)
    todo = sorted(zip(shas, paths, strict=True))
    shards = split(todo, 12)
    # the 9th image of the first shard: its batches 1-2 (4 images) are in the cache by then, the
    # decoding runs two batches ahead (features.decoded), so its load starts after they were written
    victim = shards[0][8][1].name
    flag = tmp_path / "killed"
    job = Job(
        str(backbone_onnx(tiny, tmp_path / "cache")),
        str(tmp_path / "cache"),
        features.cache.dir.name,
        tiny.num_features,
        tiny.spec,
        2,
        1,
        partial(dies_once, spec=tiny.spec, flag=flag, victim=victim),
    )
    results = run(job, shards, EngineParams(runner=runner, workers=2, retries=2))
    assert flag.exists(), "the worker was never killed: the test proves nothing"
    assert [r["keys"] for r in results] == [[k for k, _ in s] for s in shards]
    assert 0 < results[0]["computed"] <= len(shards[0]) - 4  # what it wrote before dying was kept
    x, computed = features(paths, shas)
    assert computed == 0
    np.testing.assert_array_equal(x, local)


def test_a_dask_address_that_does_not_answer_is_one_line_in_bounded_time(tmp_path, tiny, prefect_harness):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths, shas = _images(tmp_path, per_class=2)
    p = EngineParams(runner="dask", dask_address=f"tcp://127.0.0.1:{port}", connect_timeout_s=2)
    features = Features(tiny, "onnxruntime", tmp_path / "cache", runner=p, run_shards=run)
    start = time.monotonic()
    with pytest.raises(HeadstartError, match=rf"engine.dask_address tcp://127.0.0.1:{port}: no Dask"):
        features(paths, shas)
    assert time.monotonic() - start < 30
    assert not list(features.cache.dir.rglob("*"))  # no entry, whole or half-written


def test_an_undecodable_image_in_a_shard_is_one_line_and_not_retried(tmp_path, tiny, prefect_harness):
    paths, shas = _images(tmp_path, per_class=3)
    write_bytes(paths[2], b"\x89PNG truncated")
    p = EngineParams(runner="process", workers=1, threads=1, shard_size=3, retries=2)
    features = Features(tiny, "onnxruntime", tmp_path / "cache", batch_size=2, runner=p, run_shards=run)
    start = time.monotonic()
    with pytest.raises(HeadstartError, match=rf"{paths[2].name} cannot be decoded"):
        features(paths, shas)
    assert time.monotonic() - start < 120
