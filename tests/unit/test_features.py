"""headstart.features: the feature cache, the runtimes (torch, onnxruntime) and the extraction loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from headstart import HeadstartError, provenance
from headstart.backbones import load_backbone
from headstart.data.manifest import scan
from headstart.features import (
    FeatureCache,
    Features,
    OrtEngine,
    TorchEngine,
    backbone_onnx,
    engine_key,
    extract_features,
    feature_key,
    make_engine,
    resolve_runtime,
)
from tests.conftest import TINY_BACKBONE, make_folder

EXTS = [".png"]


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])


def test_feature_cache_roundtrip(tmp_path):
    cache = FeatureCache(tmp_path, "key-1")
    sha = "ab" + "0" * 62
    assert cache.get(sha) is None
    vec = np.arange(8, dtype=np.float64) / 3
    cache.put(sha, vec)
    got = cache.get(sha)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, vec.astype(np.float32))
    assert (tmp_path / "features" / "key-1" / "ab" / f"{sha}.npy").is_file()
    # another key is another cache
    assert FeatureCache(tmp_path, "key-2").get(sha) is None


def _damaged(cache, sha, caplog, write) -> None:
    """The entry `write(path)` leaves reads as missing, is deleted and logged with its file's name."""
    cache.put(sha, np.ones(4, np.float32))
    path = cache._path(sha)
    write(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "headstart.features"):
        assert cache.get(sha) is None
    assert not path.exists() and path.name in caplog.text and "damaged" in caplog.text


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p: p.write_bytes(b"garbage, not npy"), id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:3]), id="truncated-header"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-5]), id="truncated-data"),
        pytest.param(lambda p: np.save(p, np.ones(5, np.float32)), id="wrong-length"),
        pytest.param(lambda p: np.save(p, np.ones((2, 2), np.float32)), id="wrong-ndim"),
        pytest.param(lambda p: np.save(p, np.ones(4, np.float64)), id="wrong-dtype"),
        pytest.param(lambda p: np.save(p, np.full(4, np.nan, np.float32)), id="nan"),
        pytest.param(lambda p: np.save(p, np.array([1, np.inf, 0, 0], np.float32)), id="inf"),
    ],
)
def test_feature_cache_damaged_entry_is_discarded_with_a_warning(tmp_path, caplog, write):
    _damaged(FeatureCache(tmp_path, "k", length=4), "cd" + "1" * 62, caplog, write)


def test_feature_cache_without_length_checks_against_the_first_good_entry(tmp_path, caplog):
    cache = FeatureCache(tmp_path, "k")
    cache.put("aa" + "0" * 62, np.ones(4, np.float32))
    assert cache.get("aa" + "0" * 62).shape == (4,)
    _damaged(cache, "bb" + "0" * 62, caplog, lambda p: np.save(p, np.ones(6, np.float32)))


def test_feature_cache_refuses_pickled_object_array(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    sha = "ef" + "2" * 62
    path = tmp_path / "features" / "k" / "ef" / f"{sha}.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert cache.get(sha) is None and not path.exists()


# --- with the tiny backbone -------------------------------------------------------------------------


def _folder_features(tmp_path, tiny, per_class):
    """A tiny image folder's paths and hashes, an empty feature cache and the frozen extractor."""
    root = make_folder(tmp_path / "data", per_class=per_class)
    m = scan(root, EXTS, tmp_path / "probe_cache")
    cache = FeatureCache(tmp_path / "cache", tiny.cache_key)
    return [root / p for p in m["path"]], list(m["sha256"]), cache, tiny.feature_extractor()


def test_extract_features_uses_cache(tmp_path, tiny):
    paths, shas, cache, fx = _folder_features(tmp_path, tiny, per_class=5)

    first, n1 = extract_features(fx, tiny.spec, paths, shas, cache, batch_size=4)
    assert n1 == 10
    assert first.shape == (10, 256) and first.dtype == np.float32
    assert np.isfinite(first).all()
    second, n2 = extract_features(fx, tiny.spec, paths, shas, cache, batch_size=4)
    assert n2 == 0
    np.testing.assert_array_equal(first, second)

    # the features are the backbone's, in the manifest's order
    from headstart.preprocess import load_batch

    with torch.no_grad():
        direct = fx(torch.from_numpy(load_batch(paths[:2], tiny.spec))).numpy()
    np.testing.assert_allclose(first[:2], direct, rtol=1e-4, atol=1e-5)


def test_extract_features_duplicates_and_partial_cache(tmp_path, tiny):
    paths, shas, cache, fx = _folder_features(tmp_path, tiny, per_class=3)
    _, n = extract_features(fx, tiny.spec, paths[:2], shas[:2], cache, batch_size=4)
    assert n == 2
    # the same image twice is computed once; the two cached ones are not recomputed
    feats, n = extract_features(fx, tiny.spec, paths + paths[:1], shas + shas[:1], cache, batch_size=4)
    assert n == len(paths) - 2
    assert feats.shape[0] == len(paths) + 1
    np.testing.assert_array_equal(feats[0], feats[-1])


def test_onnxruntime_and_torch_give_the_same_features(tmp_path, tiny):
    paths, shas, _, fx = _folder_features(tmp_path, tiny, per_class=4)
    ort_engine = OrtEngine(backbone_onnx(tiny, tmp_path / "cache"))
    by_torch, _ = extract_features(TorchEngine(fx), tiny.spec, paths, shas, FeatureCache(tmp_path, "t"), 3)
    by_ort, _ = extract_features(ort_engine, tiny.spec, paths, shas, FeatureCache(tmp_path, "o"), 3)
    scale = np.abs(by_torch).max()
    assert np.abs(by_torch - by_ort).max() <= 1e-4 * max(scale, 1e-3)
    assert (by_torch.argmax(1) == by_ort.argmax(1)).all()


def test_onnxruntime_engine_in_chunks_gives_whole_batch_outputs(tmp_path, tiny):
    """max_batch splits a batch (7 = 3 + 3 + 1) and joins the outputs, single or many, in order."""
    from headstart.domain import Probe

    x = np.random.default_rng(0).normal(size=(7, 3, tiny.spec.size, tiny.spec.size)).astype(np.float32)
    for path in (backbone_onnx(tiny, tmp_path), backbone_onnx(tiny, tmp_path, probe=Probe(tiny))):
        whole, chunked = OrtEngine(path)(x), OrtEngine(path, max_batch=3)(x)
        for a, b in zip(*(o if isinstance(o, list) else [o] for o in (whole, chunked)), strict=True):
            assert a.shape == b.shape and a.shape[0] == 7
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_engines_run_onnxruntime_in_small_chunks_whatever_batch_is_decoded(tmp_path, tiny, monkeypatch):
    """Memory: make_engine's extractor runs at most ORT_CHUNK images per onnxruntime call, the domain
    probe PROBE_CHUNK (activations and the arena holding them grow with the batch: 0.45 vs 0.21 GB
    on the demo); a batch of 32 decoded images still gives 32 rows, as the whole batch does."""
    from headstart.domain import Probe
    from headstart.features import ORT_CHUNK, PROBE_CHUNK, make_engine

    x = np.random.default_rng(0).normal(size=(32, 3, tiny.spec.size, tiny.spec.size)).astype(np.float32)
    for probe, chunk in ((None, ORT_CHUNK), (Probe(tiny), PROBE_CHUNK)):
        engine = make_engine(tiny, "onnxruntime", tmp_path, probe=probe)
        sizes = []
        monkeypatch.setattr(engine, "session", _Spy(engine.session, sizes))
        out = engine(x)
        assert sizes and max(sizes) == chunk < 32 and sum(sizes) == 32
        whole = OrtEngine(backbone_onnx(tiny, tmp_path, probe=probe))(x)
        for a, b in zip(*(o if isinstance(o, list) else [o] for o in (whole, out)), strict=True):
            np.testing.assert_array_equal(a, b)  # bitwise: the chunk size changes no cached feature


class _Spy:
    """An onnxruntime session that records each run's batch size."""

    def __init__(self, session, sizes: list[int]):
        self.session, self.sizes = session, sizes

    def run(self, names, feed):
        self.sizes.append(len(next(iter(feed.values()))))
        return self.session.run(names, feed)


def test_backbone_onnx_is_exported_once(tmp_path, tiny):
    first = backbone_onnx(tiny, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert backbone_onnx(tiny, tmp_path) == first and first.stat().st_mtime_ns == stamp


def test_features_build_no_engine_when_everything_is_cached(tmp_path, tiny):
    paths, shas, _, _ = _folder_features(tmp_path, tiny, per_class=3)
    features = Features(tiny, "onnxruntime", tmp_path / "cache", batch_size=4)
    first, n = features(paths, shas)
    assert n == len(paths) and features._engine is not None
    again = Features(tiny, "onnxruntime", tmp_path / "cache", batch_size=4)
    second, n = again(paths, shas)
    assert n == 0 and again._engine is None  # a warm re-run never exports or starts a session
    np.testing.assert_array_equal(first, second)
    torch_features = Features(tiny, "torch", tmp_path / "cache")
    assert torch_features.cache.dir != again.cache.dir  # each runtime keeps its own features


def test_features_recompute_damaged_entries_with_a_warning(tmp_path, tiny, caplog):
    """A truncated, a wrong-shape and a NaN-filled feature file: each is recomputed, never trusted."""
    paths, shas, _, _ = _folder_features(tmp_path, tiny, per_class=3)
    features = Features(tiny, "torch", tmp_path / "cache", batch_size=4)
    first, _ = features(paths, shas)
    damage = {
        shas[0]: lambda p: p.write_bytes(p.read_bytes()[:100]),
        shas[1]: lambda p: np.save(p, np.ones(7, np.float32)),
        shas[2]: lambda p: np.save(p, np.full(tiny.num_features, np.nan, np.float32)),
    }
    for sha, write in damage.items():
        write(features.cache._path(sha))
    with caplog.at_level(logging.WARNING, "headstart.features"):
        again, n = Features(tiny, "torch", tmp_path / "cache", batch_size=4)(paths, shas)
    assert n == 3 and caplog.text.count("damaged") == 3
    assert all(sha in caplog.text for sha in damage)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)


def _edited(monkeypatch, module: str) -> None:
    """As if `module`'s source had changed: its code hash (and any hash naming it) differs."""
    real = provenance.code_hash
    monkeypatch.setattr(provenance, "code_hash", lambda *m: real(*m) + ("-edited" if module in m else ""))


def test_feature_key_changes_with_code_libraries_and_opset(tmp_path, tiny, monkeypatch):
    base = {rt: feature_key(tiny, rt) for rt in ("torch", "onnxruntime")}
    assert base["torch"] != base["onnxruntime"] and base["torch"] == feature_key(tiny, "torch")
    assert feature_key(tiny, "onnxruntime", opset=19) != base["onnxruntime"]
    assert feature_key(tiny, "torch", opset=19) == base["torch"]  # torch runs no ONNX graph
    with monkeypatch.context() as m:
        _edited(m, "headstart.preprocess")
        assert all(feature_key(tiny, rt) != key for rt, key in base.items())
        assert Features(tiny, "torch", tmp_path).cache.dir.name != base["torch"]
    real = provenance.version
    with monkeypatch.context() as m:
        m.setattr(provenance, "version", lambda d: "99.0" if d == "onnxruntime-gpu" else real(d))
        assert feature_key(tiny, "onnxruntime") != base["onnxruntime"]
        assert feature_key(tiny, "torch") == base["torch"]
    with monkeypatch.context() as m:
        m.setattr(provenance, "version", lambda d: "99.0" if d == "pillow" else real(d))
        assert all(feature_key(tiny, rt) != key for rt, key in base.items())


def test_editing_the_preprocessing_misses_the_cache(tmp_path, tiny, monkeypatch):
    paths, shas, _, _ = _folder_features(tmp_path, tiny, per_class=2)
    assert Features(tiny, "torch", tmp_path / "cache")(paths, shas)[1] == len(shas)
    assert Features(tiny, "torch", tmp_path / "cache")(paths, shas)[1] == 0
    _edited(monkeypatch, "headstart.preprocess")
    assert Features(tiny, "torch", tmp_path / "cache")(paths, shas)[1] == len(shas)


def test_views_tag_follows_the_augmentation_code(tmp_path, tiny, monkeypatch):
    paths, shas, _, _ = _folder_features(tmp_path, tiny, per_class=1)
    features = Features(tiny, "torch", tmp_path / "cache")
    features.cache = FeatureCache(tmp_path / "cache", "fixed-dir")  # only the views' tag may change
    assert features.views(paths, shas, 1, seed=0)[1] == len(shas)
    assert features.views(paths, shas, 1, seed=0)[1] == 0
    assert features.views(paths, shas, 1, seed=1)[1] == len(shas)
    _edited(monkeypatch, "headstart.preprocess")
    assert features.views(paths, shas, 1, seed=0)[1] == len(shas)
    assert features.views(paths, shas, 1, seed=0)[1] == 0


def test_engine_key_changes_with_opset_graph_code_and_libraries(tiny, monkeypatch):
    base, probe = engine_key(tiny), engine_key(tiny, probe=True)
    assert base != probe and base == engine_key(tiny)
    assert engine_key(tiny, opset=19) != base
    with monkeypatch.context() as m:
        _edited(m, "headstart.domain")  # the probe's graph builder: only the probe engine changes
        assert engine_key(tiny) == base and engine_key(tiny, probe=True) != probe
    with monkeypatch.context() as m:
        _edited(m, "headstart.export")
        assert engine_key(tiny) != base and engine_key(tiny, probe=True) != probe
    real = provenance.version
    monkeypatch.setattr(provenance, "version", lambda d: "99.0" if d == "torch" else real(d))
    assert engine_key(tiny) != base


def test_damaged_engine_is_exported_again(tmp_path, tiny, caplog):
    path = backbone_onnx(tiny, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, "headstart.features"):
        assert backbone_onnx(tiny, tmp_path) == path
    assert path.read_bytes() == good and path.name in caplog.text and "damaged" in caplog.text


def test_engine_onnxruntime_refuses_is_exported_again_once(tmp_path, tiny, monkeypatch, caplog):
    import headstart.features as features

    path = backbone_onnx(tiny, tmp_path)
    real, calls = features.OrtEngine, []

    def refuse_first(onnx_path, **kw):
        calls.append(onnx_path)
        if len(calls) == 1:
            raise RuntimeError("INVALID_PROTOBUF")
        return real(onnx_path, **kw)

    monkeypatch.setattr(features, "OrtEngine", refuse_first)
    with caplog.at_level(logging.WARNING, "headstart.features"):
        engine = make_engine(tiny, "onnxruntime", tmp_path)
    assert calls == [path, path] and isinstance(engine, real) and "INVALID_PROTOBUF" in caplog.text
    x = np.zeros((1, 3, tiny.spec.size, tiny.spec.size), np.float32)
    assert engine(x).shape == (1, tiny.num_features)


def test_runtime_resolution():
    assert resolve_runtime("auto") == ("torch-cuda" if torch.cuda.is_available() else "onnxruntime")
    with pytest.raises(HeadstartError, match="unknown runtime"):
        resolve_runtime("tensorflow")
    if not torch.cuda.is_available():
        with pytest.raises(HeadstartError, match="no CUDA device"):
            resolve_runtime("torch-cuda")


@pytest.mark.gpu
def test_cuda_fp16_features_match_the_cpu(tmp_path, tiny):
    paths, shas, _, fx = _folder_features(tmp_path, tiny, per_class=3)
    cpu, _ = extract_features(TorchEngine(fx), tiny.spec, paths, shas, FeatureCache(tmp_path, "c"))
    gpu, _ = extract_features(TorchEngine(fx, "cuda"), tiny.spec, paths, shas, FeatureCache(tmp_path, "g"))
    assert np.abs(cpu - gpu).max() <= 2e-2 * max(np.abs(cpu).max(), 1e-3)


@pytest.mark.pretrained
def test_lite0_features_agree_between_runtimes_on_real_photos(tmp_path):
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[-1])
    lite0 = load_backbone("efficientnet_lite0")
    shas = [p.stem for p in paths]
    by_torch, _ = extract_features(
        TorchEngine(lite0.feature_extractor()), lite0.spec, paths, shas, FeatureCache(tmp_path, "t")
    )
    by_ort, _ = extract_features(
        OrtEngine(backbone_onnx(lite0, tmp_path)), lite0.spec, paths, shas, FeatureCache(tmp_path, "o")
    )
    assert np.abs(by_torch - by_ort).max() <= 1e-4 * np.abs(by_torch).max()


def test_engines_are_shared_by_the_projects_of_a_user(tmp_path, tiny, monkeypatch):
    """HEADSTART_CACHE (else ~/.cache/headstart): a second project exports nothing; a damaged shared
    graph is exported again; `project` keeps them in the project's cache; the sharded runner's
    workers get a copy in the project's cache_dir (they may not see this user's cache)."""
    import headstart.export as export
    from headstart.features import engines_dir, in_project, intact

    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "user"))
    first = backbone_onnx(tiny, tmp_path / "project_a")
    assert first.parent == tmp_path / "user" / "engines" and intact(first)
    assert not (tmp_path / "project_a" / "engines").exists()
    calls = []
    real = export.to_onnx
    monkeypatch.setattr(export, "to_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert backbone_onnx(tiny, tmp_path / "project_b") == first and calls == []
    first.write_bytes(first.read_bytes()[:1000])
    assert backbone_onnx(tiny, tmp_path / "project_b") == first and calls == [1] and intact(first)
    local = in_project(first, tmp_path / "project_b")
    assert (
        local == tmp_path / "project_b" / "engines" / first.name and local.read_bytes() == first.read_bytes()
    )
    assert intact(local) and in_project(local, tmp_path / "project_b") == local
    monkeypatch.setenv("HEADSTART_CACHE", "project")
    assert engines_dir(tmp_path / "p") == tmp_path / "p" / "engines"
    monkeypatch.delenv("HEADSTART_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engines_dir(tmp_path / "p") == tmp_path / "xdg" / "headstart" / "engines"


def test_an_engine_that_differs_from_torch_is_never_cached(tmp_path):
    """The backbone's export is held to torch on seeded inputs before it is cached: the figure of a
    faithful export is tiny; a graph that computes something else (here: weights 1% off) is refused
    in one line that names the file."""
    from headstart.export import to_onnx
    from headstart.features import check_engine

    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    graph = to_onnx(module, 32, 18, output="features").SerializeToString()
    assert 0 <= check_engine(module, graph, 32, tmp_path / "engine.onnx") < 1e-5
    with torch.no_grad():
        module[0].weight.mul_(1.01)
    with pytest.raises(HeadstartError, match=r"engine\.onnx does not compute what torch does"):
        check_engine(module, graph, 32, tmp_path / "engine.onnx")
