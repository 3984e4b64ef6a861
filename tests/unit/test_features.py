"""headstart.features: the feature cache, the runtimes (torch, onnxruntime) and the extraction loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart import HeadstartError
from headstart.backbones import load_backbone
from headstart.data.manifest import scan
from headstart.features import (
    FeatureCache,
    Features,
    OrtEngine,
    TorchEngine,
    backbone_onnx,
    extract_features,
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


def test_feature_cache_corrupt_entry_is_none(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    sha = "cd" + "1" * 62
    cache.put(sha, np.ones(4, np.float32))
    path = tmp_path / "features" / "k" / "cd" / f"{sha}.npy"
    path.write_bytes(b"garbage, not npy")
    assert cache.get(sha) is None
    path.write_bytes(path.read_bytes()[:3])
    assert cache.get(sha) is None


def test_feature_cache_refuses_pickled_object_array(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    sha = "ef" + "2" * 62
    path = tmp_path / "features" / "k" / "ef" / f"{sha}.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert cache.get(sha) is None


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
