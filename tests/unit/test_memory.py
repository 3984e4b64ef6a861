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


_GLIBC_PROBE = r"""
import ctypes, sys
import numpy as np
from headstart.ops import memory

class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mapped():  # bytes glibc holds in blocks of their own (mmapped, unmapped when freed)
    return libc.mallinfo2().hblkhd
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

MB = 1 << 20
if sys.argv[1] == "fixed":
    assert memory.return_freed_buffers()
with memory.reused_buffers():  # without the fixed threshold this changes nothing
    pass
big = np.ones(30 * MB, np.uint8); del big  # glibc would raise its threshold to 30 MB here...
before = rss()
buf = np.ones(20 * MB, np.uint8)  # ...so 20 MB would come from the heap
pin = np.ones(1, np.uint8)  # and anything allocated after it keeps it there
held = mapped()
del buf
print(int(held >= 20 * MB), round((rss() - before) / MB))
m0 = mapped()
with memory.reused_buffers():
    inside = np.ones(MB, np.uint8)
    lifted = mapped() - m0
    del inside
outside = np.ones(MB, np.uint8)
print(int(lifted < MB), int(mapped() - m0 >= MB))
del outside
m0 = mapped()
with memory.reused_buffers():
    with memory.reused_buffers():
        pass
    inner = np.ones(MB, np.uint8)  # the outer block still runs: still from the heap
    nested = mapped() - m0
    del inner
after = np.ones(MB, np.uint8)
print(int(nested < MB), int(mapped() - m0 >= MB))
"""


def _probe(mode: str) -> list[list[int]]:
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-c", _GLIBC_PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout
    return [[int(v) for v in line.split()] for line in out.splitlines()]


def test_freed_buffers_go_back_at_once_with_the_fixed_threshold():
    """headstart.ops.memory: with the threshold fixed, a 20 MB buffer freed after a 30 MB one is
    unmapped (RSS back where it was); glibc's own policy keeps it in the heap (RSS 20 MB higher). This
    is the mechanism that took ~0.2 GB off the demo flow's peak."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        import pytest

        pytest.skip("not glibc >= 2.33: the policy is a no-op there (return_freed_buffers is False)")
    (own_mapped, own_kept), (own_lift, own_out), _ = _probe("glibc")
    (fixed_mapped, fixed_kept), (lift, out), (nested, after) = _probe("fixed")
    assert own_mapped == 0 and own_kept >= 19  # glibc's raised threshold: heap, and it stays
    assert fixed_mapped == 1 and abs(fixed_kept) <= 2  # fixed: its own mapping, gone when freed
    assert lift == 1 and out == 1  # reused_buffers: 1 MB from the heap inside, mmapped after
    assert own_out == 0  # without the fixed threshold, reused_buffers left glibc's own policy alone
    assert nested == 1 and after == 1  # an inner block's end keeps the outer block's lift
