"""headstart.backbones: safe weight loading, frozen feature extractors, cache keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from headstart import HeadstartError
from headstart.backbones import load_backbone, load_state_dict
from headstart.preprocess import load_batch
from tests.conftest import TINY_BACKBONE


class Payload:
    """Any custom class: unpickling it would run arbitrary code paths, so weights_only refuses it."""

    def __init__(self):
        self.value = 42


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])


def test_tiny_backbone_loads(tiny, tiny_weights):
    assert tiny.name == TINY_BACKBONE
    assert tiny.spec.size == 160
    assert tiny.num_features == 256
    assert tiny.weights_sha256 == tiny_weights[1]
    assert len(tiny.spec.mean) == 3 and len(tiny.spec.std) == 3
    # the weights from the file are the ones in the model
    saved = torch.load(tiny_weights[0], weights_only=True)
    for key, value in tiny.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_feature_extractor_is_frozen(tiny):
    fx = tiny.feature_extractor()
    assert all(not p.requires_grad for p in fx.parameters())
    assert not fx.training
    assert all(not m.training for m in fx.modules())
    with torch.no_grad():
        out = fx(torch.randn(3, 3, 160, 160))
    assert out.shape == (3, 256)
    # the backbone itself is frozen too, and keeps its classifier
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training
    with torch.no_grad():
        assert tiny.model(torch.randn(1, 3, 160, 160)).shape[1] == 1000


def test_feature_extractor_does_not_change_running_stats(tiny):
    fx = tiny.feature_extractor()
    before = {k: v.clone() for k, v in fx.state_dict().items()}
    with torch.no_grad():
        fx(torch.randn(4, 3, 160, 160) * 5 + 3)
    for k, v in fx.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_wrong_sha256_raises(tiny_weights):
    with pytest.raises(HeadstartError, match="sha256"):
        load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256="0" * 64)


def test_pickle_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(HeadstartError, match="not a plain state_dict"):
        load_state_dict(path, None)
    # checksum matches, the content is still refused
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(HeadstartError, match="not a plain state_dict"):
        load_backbone(TINY_BACKBONE, weights=path, weights_sha256=sha)


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(HeadstartError, match="does not exist"):
        load_backbone(TINY_BACKBONE, weights=tmp_path / "nope.pth")


def test_weights_that_do_not_fit_raise(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(HeadstartError, match="does not fit"):
        load_backbone(TINY_BACKBONE, weights=path)


def test_nested_state_dict_is_accepted(tmp_path, tiny_weights):
    state = torch.load(tiny_weights[0], weights_only=True)
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": state}, path)
    assert set(load_state_dict(path, None)) == set(state)


def test_cache_key_depends_on_weights(tmp_path, tiny, tiny_weights):
    torch.manual_seed(1)
    import timm

    other = timm.create_model(TINY_BACKBONE, pretrained=False)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    b2 = load_backbone(TINY_BACKBONE, weights=path)
    assert b2.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert b2.cache_key != tiny.cache_key
    assert tiny.cache_key.startswith(TINY_BACKBONE)
    # same file, same key
    b3 = load_backbone(TINY_BACKBONE, weights=tiny_weights[0])
    assert b3.cache_key == tiny.cache_key


def test_unknown_backbone_raises():
    with pytest.raises(HeadstartError, match="no_such_net"):
        load_backbone("no_such_net_v9")


def test_torchvision_needs_weights():
    with pytest.raises(HeadstartError, match="weights"):
        load_backbone("tv/resnet18")


def test_torchvision_resnet18_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    b = load_backbone("tv/resnet18", weights=path)
    assert b.num_features == 512
    assert b.spec.size == 224
    assert b.cache_key.startswith("tv_resnet18-")
    fx = b.feature_extractor()
    assert all(not p.requires_grad for p in fx.parameters()) and not fx.training
    with torch.no_grad():
        out = fx(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 512)
    # the original model keeps its 1000-class fc
    assert isinstance(b.model.fc, torch.nn.Linear)


@pytest.mark.pretrained
def test_builtin_efficientnet_lite0_classifies_imagenet_images(tmp_path):
    import skimage.data

    b = load_backbone("efficientnet_lite0")
    assert b.num_features == 1280
    assert b.spec.size == 224
    paths = []
    for name in ("chelsea", "coffee"):
        p = tmp_path / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(p)
        paths.append(p)
    x = torch.from_numpy(load_batch(paths, b.spec))
    with torch.no_grad():
        logits = b.model(x)
    top1 = logits.argmax(1).tolist()
    assert top1[0] in {281, 282, 285}, top1  # tabby, tiger cat, Egyptian cat
    assert top1[1] == 967, top1  # espresso
    assert np.isfinite(logits.numpy()).all()


@pytest.mark.pretrained
def test_builtin_name_with_a_user_weights_file_keeps_the_builtin_architecture(tmp_path):
    import torch

    packaged = load_backbone("efficientnet_lite0")
    path = tmp_path / "lite0_copy.pth"
    torch.save(packaged.model.state_dict(), path)  # timm's key names, same tensor order
    again = load_backbone("efficientnet_lite0", weights=path)
    assert again.weights_sha256 != packaged.weights_sha256  # the user's file, hashed
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(again.model(x), packaged.model(x), atol=1e-5)
