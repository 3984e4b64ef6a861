"""Memory bounds that a refactor could undo silently: made images run through torch in small chunks."""

from __future__ import annotations

import numpy as np
import torch

from headstart.backbones import load_backbone
from headstart.models import PIXEL_CHUNK, pixel_logits
from headstart.preprocess import normalise
from headstart.training import TrainedModel, make_head
from tests.conftest import TINY_BACKBONE


def test_made_images_pass_the_backbone_a_few_at_a_time(tiny_weights):
    """evaluate's far-out images (16 per kind) go through eager torch PIXEL_CHUNK at a time: at 16,
    Lite0's activations held 0.27 GB more on the demo; the logits are the whole batch's."""
    backbone = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    torch.manual_seed(0)
    model = TrainedModel(make_head(backbone.num_features, 2, 8, 0.0).eval(), backbone, ["a", "b"])
    s = backbone.spec.size
    pixels = np.random.default_rng(0).integers(0, 256, (16, s, s, 3), dtype=np.uint8)
    sizes = []
    hook = model.module.features.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    try:
        logits, features = pixel_logits(model, pixels, with_features=True)
    finally:
        hook.remove()
    assert max(sizes) == PIXEL_CHUNK < 16 and sum(sizes) == 16
    assert logits.shape == (16, 2) and features.shape == (16, backbone.num_features)
    x = torch.from_numpy(np.stack([normalise(p, backbone.spec) for p in pixels]))
    with torch.no_grad():
        whole = model.module(x).numpy()
    np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-5)
