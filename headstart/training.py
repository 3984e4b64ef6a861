"""The new head, the feature cache and the fit loop: the backbone's forward pass is paid once per image."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from headstart import HeadstartError
from headstart.atomic import write_bytes
from headstart.backbones import Backbone, freeze, load_backbone
from headstart.config import MAX_EPOCHS, TrainHeadParams
from headstart.features import Features
from headstart.ops.memory import reused_buffers

MODEL_FORMAT = "headstart.model/1"


def tensor_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each tensor's bytes: the proof that what should be frozen stayed frozen."""
    return {
        name: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, t in tensors.items()
    }


def digest(prints: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(prints.items())).encode()).hexdigest()


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def frozen_tensors(extractor: nn.Module, trainable: list[str]) -> dict[str, torch.Tensor]:
    """Every parameter not being trained and every buffer (BatchNorm statistics included)."""
    keep = set(trainable)
    out = {k: p for k, p in extractor.named_parameters() if k not in keep}
    out.update(dict(extractor.named_buffers()))
    return out


@contextmanager
def proven_frozen(model: nn.Module, trainable: list[str], what: str) -> Iterator[dict]:
    """Hash every tensor that must stay frozen (all but `trainable`, BatchNorm buffers included)
    before and after the block; a change refuses the block's result. Yields the proof for the report."""
    before = tensor_hashes(frozen_tensors(model, trainable))
    proof: dict = {}
    yield proof
    after = tensor_hashes(frozen_tensors(model, trainable))
    _refuse_moved(changed(before, after), what)
    proof.update(tensors=len(after), sha256=digest(after), unchanged=True)


@contextmanager
def proven_frozen_backbone(backbone: Backbone, what: str) -> Iterator[dict]:
    """proven_frozen over a whole backbone that may not be built yet (a built-in one is built on first
    use), without building it only to hash it. Built before the block: hashed before and after. Built
    during it: its tensors after must equal a fresh build's from the same checked weights. Never
    built: no tensor existed that could change, and the proof says so."""
    common = {"loaded": True, "weights_sha256": backbone.base_sha256}
    if backbone.built:
        with proven_frozen(backbone.model, [], what) as proof:
            yield proof
        proof.update(common, compared_with="its own tensors hashed before the block")
        return
    proof = {}
    yield proof
    if not backbone.built:
        never = "nothing: never built, so no tensor existed to change (its weights' sha256 checked at load)"
        proof.update(common, loaded=False, tensors=0, sha256=None, unchanged=True, compared_with=never)
        return
    if (reference := backbone.fresh()) is None:
        raise HeadstartError(
            f"{what}: backbone {backbone.name} was built here but cannot be rebuilt to compare"
        )
    after = tensor_hashes(frozen_tensors(backbone.model, []))
    _refuse_moved(changed(tensor_hashes(frozen_tensors(reference, [])), after), what)
    fresh = "a fresh build from the same checked weights (built during the block)"
    proof.update(common, tensors=len(after), sha256=digest(after), unchanged=True, compared_with=fresh)


def _refuse_moved(moved: list[str], what: str) -> None:
    if moved:
        raise HeadstartError(
            f"{what}: {len(moved)} tensors that must stay frozen changed (e.g. {moved[:3]}); "
            "the model is not saved"
        )


def make_head(num_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout -> Linear; hidden 0: Dropout -> Linear, a linear probe (multinomial
    logistic regression on the features), often the best head on a few images."""
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    return nn.Sequential(
        nn.Linear(num_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


class HeadAdamW:
    """torch.optim.AdamW(foreach=True)'s update, bit for bit (a test holds the two together), through
    torch's own multi-tensor Adam kernel but without torch.optim's Optimizer class: its first step
    imports torch's compiler (torch._dynamo: ~150 MB kept and ~1.2 s in every process that trains a
    head; measured on the demo flow), which a head trained on cached features never uses. Falls back
    to torch.optim.AdamW where torch no longer has that kernel."""

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.steps = [torch.tensor(0.0) for _ in self.params]  # AdamW's state["step"]: a float32 tensor
        self.exp_avgs = [torch.zeros_like(q, memory_format=torch.preserve_format) for q in self.params]
        self.exp_avg_sqs = [torch.zeros_like(q, memory_format=torch.preserve_format) for q in self.params]
        try:
            from torch.optim.adam import _multi_tensor_adam as kernel
        except ImportError:
            kernel = None
        self._kernel = kernel
        self._fallback = None if kernel else torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    def zero_grad(self) -> None:
        for q in self.params:
            q.grad = None  # what Optimizer.zero_grad does by default (set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        if self._fallback is not None:
            self._fallback.step()
            return
        live = [i for i, q in enumerate(self.params) if q.grad is not None]
        self._kernel(
            [self.params[i] for i in live],
            [self.params[i].grad for i in live],
            [self.exp_avgs[i] for i in live],
            [self.exp_avg_sqs[i] for i in live],
            [],
            [self.steps[i] for i in live],
            grad_scale=None,
            found_inf=None,
            amsgrad=False,
            has_complex=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
            capturable=False,
            differentiable=False,
            decoupled_weight_decay=True,
        )


class Classifier(nn.Module):
    """Frozen feature extractor + trained head: what evaluate measures and export ships."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.head = freeze(features), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, averaging 1 over the samples: each class weighs the same in the loss."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def balanced_order(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An epoch's sample order drawn with replacement so that each class is equally likely."""
    counts = torch.bincount(y).double()
    weights = (1.0 / counts)[y]
    return torch.multinomial(weights, len(y), replacement=True, generator=gen)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: a head's matrices are small enough that a second thread's synchronisation
    costs more than it computes (2-4x slower per epoch on 2 busy cores, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_thread()
@reused_buffers()  # thousands of steps allocate and free the same 0.16-0.65 MB tensors
def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    p: TrainHeadParams,
    seed: int,
    views: np.ndarray | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> tuple[nn.Sequential, list[dict], int]:
    """Train the head on cached features; early stopping on validation loss; returns the best head.
    `views` (n, K, F): features of K augmented views per training image; each epoch shows every
    image once, as its original or one of its views, drawn by the seeded generator. `on_epoch` gets
    each epoch's history row as it is computed (live curves); `progress` False hides the bar (searches).
    Every random number comes from generators seeded by `seed` (torch's global one is left alone), so
    heads can train side by side in threads (fit_heads) and each is the same as trained alone."""
    return _fit_head(x_train, y_train, x_val, y_val, num_classes, p, seed, views, on_epoch, progress)


@one_thread()
@reused_buffers()
def fit_heads(
    fits: list[dict],
    num_classes: int,
    p: TrainHeadParams,
    on_done: Callable[[int, tuple], None] | None = None,
) -> list[tuple]:
    """fit_head for each of `fits` (its keyword arguments x_train, y_train, x_val, y_val, seed and
    optionally views), side by side on one thread per core (a head trains on one torch thread: the
    cores a single fit leaves idle), each head the same, bit for bit, as fit_head gives alone.
    `on_done(i, result)` sees the results in order; what it raises stops the fits not yet started."""
    workers = max(1, min(len(fits), _cores()))
    with ThreadPoolExecutor(workers, thread_name_prefix="fit_head") as pool:
        futures = [pool.submit(_fit_head, **f, num_classes=num_classes, p=p, progress=False) for f in fits]
        results = []
        try:
            for i, future in enumerate(futures):
                results.append(future.result())
                if on_done is not None:
                    on_done(i, results[-1])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    p: TrainHeadParams,
    seed: int,
    views: np.ndarray | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> tuple[nn.Sequential, list[dict], int]:
    rng = torch.Generator().manual_seed(seed)  # the weights' initialisation, then dropout's masks
    gen = torch.Generator().manual_seed(seed)  # the epochs' order and views
    with torch.device("meta"):  # built without weights (nothing drawn from torch's global generator)
        head = make_head(x_train.shape[1], num_classes, p.hidden, p.dropout)
    head = init_head(head.to_empty(device="cpu"), rng)
    opt = HeadAdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    weights = class_weights(y_train, num_classes) if p.class_balance == "weighted" else None
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    xt, yt = torch.tensor(x_train), torch.tensor(y_train).long()
    pool = torch.cat([xt[:, None], torch.tensor(views)], 1) if views is not None and views.shape[1] else None
    xv, yv = (torch.tensor(x_val), torch.tensor(y_val).long()) if len(y_val) else (xt, yt)
    history, best, best_state, best_epoch, waited = [], float("inf"), None, 0, 0
    for epoch in (
        bar := tqdm(range(1, p.max_epochs + 1), desc="train_head", unit="epoch", disable=not progress)
    ):
        head.train()
        order = (
            balanced_order(yt, gen)
            if p.class_balance == "sampler"
            else torch.randperm(len(yt), generator=gen)
        )
        total = 0.0
        x_epoch = (
            xt
            if pool is None
            else pool[torch.arange(len(yt)), torch.randint(0, pool.shape[1], (len(yt),), generator=gen)]
        )
        for i in range(0, len(yt), p.batch_size):
            idx = order[i : i + p.batch_size]
            opt.zero_grad()
            loss = loss_fn(train_forward(head, x_epoch[idx], rng), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        val_loss, val_acc = _score(head, xv, yv, loss_fn)
        history.append(
            {"epoch": epoch, "train_loss": total / len(yt), "val_loss": val_loss, "val_accuracy": val_acc}
        )
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}", refresh=False)
        if on_epoch:
            on_epoch(history[-1])
        if val_loss < best - 1e-6:
            best, best_epoch, waited = val_loss, epoch, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        elif (waited := waited + 1) >= p.patience:
            break
    if best_state is None:
        raise HeadstartError("train_head diverged: the validation loss was never finite; lower train_head.lr")
    head.load_state_dict(best_state)
    return head.eval(), history, best_epoch


def init_head(head: nn.Sequential, rng: torch.Generator) -> nn.Sequential:
    """The head's Linear layers initialised as torch initialises them (nn.Linear.reset_parameters),
    drawing from `rng`: the same weights as torch.manual_seed(s) then make_head, for rng seeded s."""
    with torch.no_grad():
        for layer in head:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=rng)
                bound = 1 / math.sqrt(layer.weight.shape[1]) if layer.weight.shape[1] > 0 else 0
                nn.init.uniform_(layer.bias, -bound, bound, generator=rng)
    return head


def train_forward(head: nn.Sequential, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """The head in training mode, its dropout masks drawn from `rng`: torch's own dropout on the CPU
    (a Bernoulli(1 - p) mask scaled by 1 / (1 - p); nothing drawn at p = 0) without its global generator."""
    for layer in head:
        if isinstance(layer, nn.Dropout):
            if layer.p > 0:
                x = x * torch.empty_like(x).bernoulli_(1 - layer.p, generator=rng).div_(1 - layer.p)
        else:
            x = layer(x)
    return x


@torch.no_grad()
def _score(head: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[float, float]:
    head.eval()
    logits = head(x)
    return loss_fn(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def save_model(path: str | Path, *args, **kwargs) -> None:
    write_bytes(path, model_bytes(*args, **kwargs))


def model_bytes(
    backbone: Backbone,
    head: nn.Sequential,
    classes: list[str],
    p: TrainHeadParams,
    backbone_state: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
) -> bytes:
    """A small, safe checkpoint: the head's tensors plus the names needed to rebuild the backbone;
    after fine-tuning, also the tensors of the backbone's unfrozen blocks (`backbone_state`)."""
    state = {
        "format": MODEL_FORMAT,
        "backbone": backbone.name,
        "weights": str(p.weights) if p.weights else "",
        "weights_sha256": backbone.base_sha256,
        "spec": backbone.spec.to_json(),
        "classes": list(classes),
        "hidden": p.hidden,
        "dropout": p.dropout,
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "backbone_state": {k: v.detach().cpu() for k, v in (backbone_state or {}).items()},
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@dataclass
class TrainedModel:
    head: nn.Module
    backbone: Backbone  # fine-tuned blocks applied; its weights_sha256 then covers them too
    classes: list[str]
    finetuned: bool = False

    @property
    def kind(self) -> str:
        return "finetuned" if self.finetuned else "head"

    @functools.cached_property
    def classifier(self) -> Classifier:
        """Backbone and head as one module, built on first use: what reads cached features (logits,
        a grafted export's reference) needs only the head, and never builds the backbone."""
        return Classifier(self.backbone.feature_extractor(), self.head).eval()

    @property
    def module(self) -> nn.Module:
        """The whole model on normalised NCHW input: what export and parity run."""
        return self.classifier

    @property
    def spec(self):
        return self.backbone.spec

    def parameters(self) -> int:
        return sum(q.numel() for q in self.classifier.parameters())

    def metadata(self) -> dict[str, str]:
        return {
            "headstart.model_kind": self.kind,
            "headstart.backbone": self.backbone.name,
            "headstart.backbone_weights_sha256": self.backbone.weights_sha256,
            "headstart.finetuned": str(self.finetuned).lower(),
        }

    @torch.no_grad()
    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits from this backbone's (cached) features: the full model's output."""
        return self.head(torch.from_numpy(features)).numpy()

    def head_probabilities(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.head_logits(features))

    def logits(self, paths, shas, runtime: str, cache_dir, batch_size: int) -> np.ndarray:
        """Logits of image files, through the feature cache: features of the backbone as trained
        (pretrained, or with its fine-tuned blocks: another cache key) + the head."""
        x, _ = Features(self.backbone, runtime, cache_dir, batch_size)(
            paths, list(shas), desc="features (test)"
        )
        return self.head_logits(x)

    def probabilities(self, paths, shas, runtime: str, cache_dir, batch_size: int) -> np.ndarray:
        """Class probabilities of image files: softmax(logits)."""
        return softmax(self.logits(paths, shas, runtime, cache_dir, batch_size))

    def features(self, paths, shas, runtime: str, cache_dir, batch_size: int) -> np.ndarray:
        """The backbone's pooled features (the head's input) of image files, through the cache."""
        return Features(self.backbone, runtime, cache_dir, batch_size)(paths, list(shas), desc="features")[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def read_model_file(path: str | Path, missing: str) -> dict:
    """A headstart model file's contents (weights_only: nothing is unpickled), or one line saying why
    not; `missing` says what to run when the file is not there."""
    path = Path(path)
    if not path.is_file():
        raise HeadstartError(f"model file {path} does not exist; {missing}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HeadstartError(f"{path}: not a headstart model file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise HeadstartError(f"{path}: not a headstart model file")
    return state


def load_model(path: str | Path) -> TrainedModel:
    """Rebuild the transfer classifier from save_model's file."""
    return transfer_model(read_model_file(path, "run the train_head stage first"), Path(path))


def transfer_model(state: dict, path: Path) -> TrainedModel:
    """The transfer classifier from a model file's contents (read_model_file)."""
    if state.get("format") != MODEL_FORMAT:
        raise HeadstartError(f"{path}: not a headstart model file")
    backbone = load_backbone(state["backbone"], state["weights"] or None, state["weights_sha256"])
    if backbone.weights_sha256 != state["weights_sha256"]:
        raise HeadstartError(f"{path}: backbone weights changed since training")
    tuned = state.get("backbone_state") or {}
    if tuned:
        apply_backbone_state(backbone, tuned, str(path))
    head = make_head(backbone.num_features, len(state["classes"]), state["hidden"], state["dropout"])
    head.load_state_dict(state["head"])
    return TrainedModel(head.eval(), backbone, list(state["classes"]), bool(tuned))


def apply_backbone_state(backbone: Backbone, tuned: dict[str, torch.Tensor], source: str) -> None:
    """Load fine-tuned tensors into the backbone; its cache key changes with them, so features of
    the fine-tuned backbone never mix with the pretrained one's."""
    import hashlib

    own = backbone.model.state_dict()
    unknown = [k for k, v in tuned.items() if k not in own or own[k].shape != v.shape]
    if unknown:
        raise HeadstartError(f"{source}: fine-tuned tensors do not fit {backbone.name}: {unknown[:5]}")
    backbone.model.load_state_dict(tuned, strict=False)
    h = hashlib.sha256(backbone.weights_sha256.encode())
    for k in sorted(tuned):
        h.update(k.encode())
        h.update(tuned[k].detach().cpu().contiguous().numpy().tobytes())
    backbone.weights_sha256 = h.hexdigest()


def out_of_fold_logits(
    x: np.ndarray, y: np.ndarray, num_classes: int, p: TrainHeadParams, folds: int, epochs: int, seed: int
) -> np.ndarray:
    """Cross-fitted logits: stratified `folds` over (x, y), a head per fold with train_head's params
    trained for `epochs` (the selected head's best epoch: no fold's own images pick its stopping
    point), each image's logits from the head that never saw it. Cheap: x are cached features."""
    fixed = p.model_copy(update={"max_epochs": max(1, epochs), "patience": MAX_EPOCHS})
    which = stratified_folds(y, folds, seed)
    out = np.zeros((len(y), num_classes), np.float32)
    empty = np.zeros((0, x.shape[1]), np.float32)
    held = {k: which == k for k in range(folds) if (which == k).any()}  # fold k's head: seed + k
    fits = [
        dict(x_train=x[~h], y_train=y[~h], x_val=empty, y_val=y[:0], seed=seed + k) for k, h in held.items()
    ]
    for h, (head, _, _) in zip(held.values(), fit_heads(fits, num_classes, fixed), strict=True):
        with torch.no_grad():
            out[h] = head(torch.from_numpy(x[h])).numpy()
    return out


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each sample's fold, 0..folds-1: every class dealt round-robin in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    which = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        which[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    return which
