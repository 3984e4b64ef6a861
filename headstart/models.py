"""Either kind of model file behind one interface, for the stages after selection (evaluate, export):
`.module` (nn.Module on normalised NCHW), `.spec`, `.classes`, `.kind` ("head" | "finetuned" |
"scratch"), `.metadata()` (what the ONNX carries about it), `.parameters()` and
`.logits(paths, shas, runtime, cache_dir, batch_size)`, `.probabilities(...)` (their softmax) and
`.features(...)` (the pooled features the out-of-distribution gate reads)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from headstart import provenance
from headstart.features import FeatureCache, feature_key, user_cache
from headstart.scratch import MODEL_FORMAT as SCRATCH_FORMAT
from headstart.scratch import ScratchModel, load_scratch
from headstart.training import TrainedModel, read_model_file, transfer_model


def load_model(path: str | Path) -> TrainedModel | ScratchModel:
    """The model in `path`: a transfer model (headstart.training's file) or a from-scratch one."""
    state = read_model_file(path, "run the select stage first")
    if state.get("format") == SCRATCH_FORMAT:
        return load_scratch(state, str(path))
    return transfer_model(state, Path(path))


def far_out_abstention(model: TrainedModel | ScratchModel, rule, cache_dir: str | Path, gate=None) -> dict:
    """The rule on made images (uniform noise, flat colours): the share it abstains on, by kind;
    `gate` (calibration.FeatureGate): the rule's feature gate, scoring their pooled features. A
    transfer model's features of them come from the feature cache (made_features)."""
    from headstart.calibration import far_out_images, far_out_rate

    made = far_out_images(model.spec.size, model.spec.channels)
    out = {}
    for kind, x in made.items():
        if isinstance(model, TrainedModel):
            features = made_features(model, x, cache_dir)
            logits = model.head_logits(features)
        else:  # a scratch model has no feature cache
            logits, features = pixel_logits(model, x, with_features=True)
        out[kind] = far_out_rate(rule, logits, None if gate is None else gate.score(features))
    return out


def made_features(model: TrainedModel, pixels: np.ndarray, cache_dir: str | Path) -> np.ndarray:
    """Pooled features of images made in memory (uint8 HWC at the input size), as pixel_logits
    computes them, in the feature cache of the torch runtime under the sha256 of each image's bytes
    and this module's code: the same images every run and every project (the user's cache), so a
    warm run, or a new project on this machine, never builds the backbone. One missing entry
    recomputes them all in one pass, so the values are always those of a whole batch."""
    where = user_cache(cache_dir)
    cache = FeatureCache(where, feature_key(model.backbone, "torch"), model.backbone.num_features)
    tag = provenance.derive_key("made", PIXEL_CHUNK, provenance.code_hash("headstart.models"))[:12]
    keys = [f"{hashlib.sha256(p.tobytes()).hexdigest()}.made-{tag}" for p in pixels]
    found = [cache.get(k) for k in keys]
    if all(f is not None for f in found):
        return np.stack(found)
    features = pixel_logits(model, pixels, with_features=True)[1]
    for key, old, vec in zip(keys, found, features, strict=True):
        if old is None:
            cache.put(key, vec)
    return features


PIXEL_CHUNK = 4  # images per eager torch pass: Lite0's activations at 16 held 0.27 GB more, same bits


def pixel_logits(model: TrainedModel | ScratchModel, pixels: np.ndarray, with_features: bool = False):
    """Logits of uint8 HWC images already at the model's input size (made, not read: no cache); with
    `with_features`, (logits, pooled features)."""
    import torch

    from headstart.export import feature_parts
    from headstart.preprocess import normalise

    x = torch.from_numpy(np.stack([normalise(p, model.spec) for p in pixels]))
    features, head = feature_parts(model.module)
    with torch.no_grad():
        f = torch.cat([features(x[i : i + PIXEL_CHUNK]) for i in range(0, len(x), PIXEL_CHUNK)])
        logits = head(f).numpy()
    return (logits, f.numpy()) if with_features else logits
