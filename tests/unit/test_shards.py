"""headstart.shards without a cluster: deterministic shards, the cache as the meeting point of
concurrent writers, the errors a sharded run gives before any worker starts, and decoding errors."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from headstart import HeadstartError
from headstart.atomic import write_bytes
from headstart.config import EngineParams
from headstart.features import FeatureCache, Features
from headstart.shards import split
from tests.conftest import scanned_images, tiny_backbone

KEYS = [f"{i:02x}" + "ab" * 31 for i in range(0, 256, 37)]


def test_shards_follow_the_content_hash_not_the_order():
    todo = [(k, f"img{i}.png") for i, k in enumerate(KEYS)]
    shards = split(todo, 3)
    assert [len(s) for s in shards] == [3, 3, 1]
    assert [k for s in shards for k, _ in s] == sorted(KEYS)
    assert split(list(reversed(todo)), 3) == shards  # the same images: the same shards


def _writer(root: str, key: str, parked, go) -> None:
    """Write every key's entry; for KEYS[0] stop after the temporary file is written, before its
    rename (`parked`), until the other writer has replaced the same entry (`go`)."""
    import headstart.atomic as atomic

    real_replace = os.replace

    def parked_replace(src, dst):
        if parked is not None and str(dst).endswith(f"{KEYS[0]}.npy"):
            parked.set()
            assert go.wait(60), "the other writer never finished"
        real_replace(src, dst)

    atomic.os.replace = parked_replace
    cache = FeatureCache(root, key, 16)
    for i, sha in enumerate(KEYS):
        cache.put(sha, np.arange(16, dtype=np.float32) + i)


def test_two_processes_writing_the_same_keys_leave_intact_identical_entries(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    parked, go = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_writer, args=(str(tmp_path), "k", parked, go))
    first.start()
    assert parked.wait(60), "the first writer never reached its rename"
    second = ctx.Process(target=_writer, args=(str(tmp_path), "k", None, None))
    second.start()  # writes every entry, KEYS[0] included, while the first holds its own copy unrenamed
    second.join(60)
    go.set()
    first.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    cache = FeatureCache(tmp_path, "k", 16)
    for i, sha in enumerate(KEYS):
        np.testing.assert_array_equal(cache.get(sha), np.arange(16, dtype=np.float32) + i)
    files = sorted(p.name for p in (tmp_path / "features" / "k").rglob("*") if p.is_file())
    assert files == sorted(f"{k}.npy" for k in KEYS)  # no temporary file left by either writer


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return tiny_backbone(tiny_weights)


def _images(tmp_path, per_class=3):
    return scanned_images(tmp_path, per_class)


def test_a_sharded_runner_needs_onnxruntime(tmp_path, tiny):
    paths, shas = _images(tmp_path)
    features = Features(tiny, "torch", tmp_path / "cache", runner=EngineParams(runner="process"))
    with pytest.raises(HeadstartError, match=r"engine.runner process runs onnxruntime.*runtime=onnxruntime"):
        features(paths, shas)
    assert not (tmp_path / "cache" / "features").exists()


def test_the_shard_map_is_flows_and_without_it_a_sharded_run_says_so(tmp_path, tiny, monkeypatch):
    """The library never imports Prefect: flows.shards sets the map (the flow and `headstart stage`
    import it); a sharded run without one is one line, before any work."""
    from headstart import shards

    monkeypatch.setattr(shards, "SHARD_MAP", None)
    paths, shas = _images(tmp_path)
    sharded = Features(tiny, "onnxruntime", tmp_path / "cache", runner=EngineParams(runner="dask"))
    with pytest.raises(HeadstartError, match=r"engine.runner dask: no shard map \(import flows.shards"):
        sharded(paths, shas)
    assert not (tmp_path / "cache").exists()  # refused before exporting the engine or writing a feature
    import importlib

    import flows.shards

    importlib.reload(flows.shards)  # importing it (again) sets the map
    assert shards.SHARD_MAP is flows.shards.run


def test_an_undecodable_image_is_one_line_naming_it(tmp_path, tiny):
    paths, shas = _images(tmp_path)
    write_bytes(paths[1], b"not an image any more")  # replaced after validate checked it
    with pytest.raises(HeadstartError, match=rf"{paths[1].name} cannot be decoded.*run prepare and validate"):
        Features(tiny, "onnxruntime", tmp_path / "cache", batch_size=2)(paths, shas)
