"""The feature engine: each image's frozen-backbone features, computed once, at the fastest runtime here.

Decoding and preprocessing run in a thread pool a few batches ahead of the backbone (Pillow releases
the GIL), so at most `prefetch` batches of pixels are ever in memory; features go to a disk cache keyed
by (backbone, weights hash, preprocessing, runtime, image sha256) and by what computed them (the code's
source, the library versions: headstart.provenance), so a re-run computes only new images, and a code fix
or an upgrade recomputes them all. Cached entries are checked when read; a damaged one is recomputed.
Runtimes: `onnxruntime` on the CPU (an ONNX export of the feature extractor, itself cached on disk),
`torch` (channels_last, inference_mode), `torch-cuda` (fp16 autocast) when a GPU is there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from headstart import HeadstartError, provenance
from headstart.atomic import write_bytes
from headstart.backbones import Backbone, sha256_file
from headstart.config import EngineParams, Runtime
from headstart.preprocess import InputSpec, load_image, load_view

if TYPE_CHECKING:
    from headstart.domain import Probe

RUNTIMES = get_args(Runtime)
OPSET = 18  # the engine's own export (a cache detail), not export.opset of the shipped model
ORT_CHUNK, PROBE_CHUNK = 8, 2  # images per onnxruntime run of the extractor and of the domain probe
ENGINE_KEY, WEIGHTS_KEY = "headstart.engine_key", "headstart.backbone_weights_sha256"  # engine metadata
LAYERS_KEY = "headstart.probe_layers"  # the probe graph's metadata: its BN layers (headstart.domain)
CHECK_KEY = "headstart.torch_rel_diff"  # engine metadata: check_engine's figure at export
CHECK_IMAGES, ENGINE_TOLERANCE = 4, 1e-3  # the export's check against torch: inputs, relative limit
log = logging.getLogger(__name__)


class TorchEngine:
    """The frozen extractor in torch: channels_last and inference_mode on the CPU, fp16 on CUDA."""

    def __init__(self, extractor: nn.Module, device: str = "cpu"):
        self.device = device
        self.name = "torch-cuda" if device.startswith("cuda") else "torch"
        self.model = extractor.eval().to(device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        t = torch.from_numpy(x).to(self.device, memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.name == "torch-cuda"):
            out = self.model(t)
        if isinstance(out, tuple):  # the domain probe: features, logits, BN statistics
            return [o.float().cpu().numpy() for o in out]
        return out.float().cpu().numpy()


class OrtEngine:
    """The frozen extractor exported once to ONNX (cached) and run by onnxruntime on the CPU."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int = 0, mem_pattern: bool = True, max_batch: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_mem_pattern = mem_pattern
        # idle ORT threads spin by default, stealing the cores that decode the next batch
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.max_batch = max_batch  # > 0: larger batches run in chunks of this size

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        step = self.max_batch or len(x)
        parts = [self.session.run(None, {self.input: x[i : i + step]}) for i in range(0, len(x), step)]
        out = [np.concatenate(o) for o in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]
        return out if len(out) > 1 else out[0]


def resolve_runtime(runtime: str) -> str:
    """`auto`: torch-cuda with a GPU, else onnxruntime (the fastest CPU runtime here)."""
    if runtime not in RUNTIMES:
        raise HeadstartError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "auto":
        return "torch-cuda" if torch.cuda.is_available() else "onnxruntime"
    if runtime == "torch-cuda" and not torch.cuda.is_available():
        raise HeadstartError("runtime torch-cuda asked for, but torch sees no CUDA device")
    return runtime


def make_engine(
    backbone: Backbone,
    runtime: str,
    cache_dir: str | Path,
    probe: Probe | None = None,
    opset: int = OPSET,
) -> TorchEngine | OrtEngine:
    """The feature extractor on a runtime; or, given `probe` (headstart.domain.Probe, whose first
    output is the same features), the domain check's instrumented backbone on it. On onnxruntime the
    probe's layers come from its cached graph, so a warm run builds no torch module."""
    runtime = resolve_runtime(runtime)
    if runtime == "onnxruntime":
        # the probe keeps ~100 extra reductions of full activation maps: ORT's memory planning
        # costs more than it saves there. Both graphs run in small chunks whatever batch the caller
        # decodes: ORT's outputs are bitwise the same at any batch size, and the activations (and
        # the arena that grows to hold them) shrink with it (Lite0, 2 threads, measured: features
        # 0.45 -> 0.21 GB peak at 32 -> 8, probe 0.57 -> 0.25 GB at 8 -> 2, neither slower)
        options = (
            {"max_batch": ORT_CHUNK} if probe is None else {"mem_pattern": False, "max_batch": PROBE_CHUNK}
        )
        path = backbone_onnx(backbone, cache_dir, opset, probe)
        try:
            return _ort_engine(path, probe, options)
        except Exception as exc:  # checker-valid yet refused by onnxruntime, or a probe graph without
            # its layers (an older export under the same key): export it again, once
            log.warning("cached engine %s does not load (%s); exporting it again", path, exc)
            path.unlink(missing_ok=True)
            return _ort_engine(backbone_onnx(backbone, cache_dir, opset, probe), probe, options)
    module = backbone.feature_extractor() if probe is None else probe.module
    return TorchEngine(module, "cuda" if runtime == "torch-cuda" else "cpu")


def _ort_engine(path: Path, probe: Probe | None, options: dict) -> OrtEngine:
    """The session on a cached graph; a probe's layers read from the graph's metadata, which its
    sha256 covers with the rest of it."""
    engine = OrtEngine(path, **options)
    if probe is not None:
        from headstart.domain import decode_layers

        meta = engine.session.get_modelmeta().custom_metadata_map
        probe.layers = decode_layers(meta[LAYERS_KEY])
    return engine


def engine_key(backbone: Backbone, opset: int = OPSET, probe: bool = False) -> str:
    """The cached ONNX engine's name: the backbone, the graph's builders' code, opset, torch and onnx."""
    modules = ["headstart.export", "headstart.backbones", *(["headstart.domain"] if probe else [])]
    parts = (backbone.cache_key, opset, probe, provenance.code_hash(*modules))
    key = provenance.derive_key(*parts, provenance.library_versions("torch", "onnx"))
    return f"{backbone.cache_key}-{'probe' if probe else 'features'}-{key}"


def backbone_onnx(
    backbone: Backbone, cache_dir: str | Path, opset: int = OPSET, probe: Probe | None = None
) -> Path:
    """The feature extractor (or the domain probe) as ONNX, exported once per engine_key, with that key
    and the weights digest in its metadata (export grafts onto it, having checked them; the probe's
    also holds its BN layers) and its sha256 beside it; a cached file that does not match its sha256
    (truncated, overwritten, a flipped weight byte that the ONNX checker would pass) is exported again.
    Only an export builds the torch module."""
    key = engine_key(backbone, opset, probe is not None)
    path = engines_dir(cache_dir) / f"{key}.onnx"
    if path.exists() and intact(path):
        return path
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):  # another project may be exporting the same graph now
        _export_engine(path, key, backbone, opset, probe)
    return path


def engines_dir(cache_dir: str | Path) -> Path:
    """Where exported engines live: the user's shared cache, so a new project on this machine exports
    no backbone again (keys as for any cache: weights, code, versions)."""
    return user_cache(cache_dir) / "engines"


def user_cache(cache_dir: str | Path) -> Path:
    """The cache a user's projects share, for what depends on no project's data (exported backbone
    graphs, the features of the images evaluate makes): HEADSTART_CACHE, else $XDG_CACHE_HOME/
    headstart or ~/.cache/headstart; HEADSTART_CACHE=project keeps it in the project's cache_dir."""
    shared = os.environ.get("HEADSTART_CACHE", "")
    if shared == "project":
        return Path(cache_dir)
    if not shared:
        shared = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "headstart"
    return Path(shared).expanduser()


def in_project(path: Path, cache_dir: str | Path) -> Path:
    """The engine at `path` in the project's cache_dir/engines (a hard link, else a copy), digest first."""
    local = Path(cache_dir) / "engines" / path.name
    if local != path and not (local.exists() and intact(local)):
        local.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(digest_path(local), digest_path(path).read_bytes())
        try:
            tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, local)
        except OSError:  # another file system
            write_bytes(local, path.read_bytes())
    return local


def _export_engine(path: Path, key: str, backbone: Backbone, opset: int, probe: Probe | None) -> None:
    if path.exists() and not intact(path):
        log.warning("cached engine %s is damaged (its sha256 does not match); exporting it again", path)
        path.unlink(missing_ok=True)
    if not path.exists():
        import onnx

        from headstart.export import to_onnx

        props = {ENGINE_KEY: key, WEIGHTS_KEY: backbone.weights_sha256}
        if probe is None:
            module, names = backbone.feature_extractor(), ["features"]
        else:
            from headstart.domain import encode_layers

            module, layers = probe.module, probe.module.layers  # the exported module's own
            names = ["features", "logits", *(f"{r['layer']}.{m}" for r in layers for m in ("mean", "meansq"))]
            props[LAYERS_KEY] = encode_layers(layers)
        proto = to_onnx(module, backbone.spec.size, opset, output=names)
        props[CHECK_KEY] = f"{check_engine(module, proto.SerializeToString(), backbone.spec.size, path):.3e}"
        onnx.helper.set_model_props(proto, props)
        data = proto.SerializeToString()
        write_bytes(digest_path(path), hashlib.sha256(data).hexdigest().encode())
        write_bytes(path, data)  # last: a reader that finds the graph finds its digest


@torch.inference_mode()
def check_engine(module: nn.Module, graph: bytes, size: int, path: Path) -> float:
    """The exported graph computes the torch module's features: both run on CHECK_IMAGES seeded
    random inputs (a graph's arithmetic does not depend on what the pixels show); the largest
    difference, relative to the features' largest magnitude, must be under ENGINE_TOLERANCE. Checked
    once, when the graph is exported: every later user of it (features, the domain probe, export's
    graft and its parity reference) runs this graph, never torch again. Returns the relative difference."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((CHECK_IMAGES, 3, size, size), dtype=np.float32)
    ours = module.eval()(torch.from_numpy(x))
    ours = (ours[0] if isinstance(ours, tuple) else ours).float().numpy()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
    diff = float(np.abs(ours - theirs).max() / max(float(np.abs(ours).max()), 1e-6))
    if not np.isfinite(diff) or diff > ENGINE_TOLERANCE:
        raise HeadstartError(
            f"the backbone's ONNX export {path.name} does not compute what torch does (largest "
            f"difference {diff:.2e} of the features' scale, limit {ENGINE_TOLERANCE:g}); it is not cached"
        )
    return diff


def digest_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def intact(path: Path) -> bool:
    """The cached engine's bytes hash to the sha256 written beside it (no record: not trusted)."""
    record = digest_path(path)
    return record.exists() and sha256_file(path) == record.read_text().strip()


def feature_key(backbone: Backbone, runtime: str, opset: int = OPSET) -> str:
    """The feature cache's folder: the backbone (weights, input spec), the runtime, and what computes
    on it: preprocessing, the extractor's and the engines' code, their libraries (and opset on ORT)."""
    modules, libs = ["headstart.preprocess", "headstart.backbones", "headstart.features"], ["numpy", "pillow"]
    if runtime == "onnxruntime":
        modules, libs = [*modules, "headstart.export"], [*libs, "onnx", "onnxruntime-gpu"]
    parts = [backbone.cache_key, runtime, provenance.code_hash(*modules)]
    parts += [provenance.library_versions("torch", *libs), opset if runtime == "onnxruntime" else None]
    return f"{backbone.cache_key}-{runtime}-{provenance.derive_key(*parts)}"


class FeatureCache:
    """Features on disk, one .npy per image, keyed by the engine's cache key and the image's sha256.
    Each entry is checked when read (a 1-d float32 vector of `length`, all finite): a damaged one is
    deleted with a warning and reads as missing, so it is computed again, never trusted."""

    def __init__(self, root: str | Path, key: str, length: int | None = None):
        self.dir = Path(root) / "features" / key
        self.length = length  # None: the first good entry read sets it

    def _path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def __contains__(self, sha: str) -> bool:
        return self._path(sha).exists()

    def get(self, sha: str) -> np.ndarray | None:
        path = self._path(sha)
        if not path.exists():
            return None
        try:
            vec = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            return self._discard(path, f"unreadable: {type(exc).__name__}: {exc}")
        if vec.dtype != np.float32 or vec.ndim != 1 or vec.shape[0] != (self.length or vec.shape[0]):
            return self._discard(path, f"{vec.dtype} {vec.shape}, expected float32 ({self.length or 'n'},)")
        if not np.isfinite(vec).all():
            return self._discard(path, "non-finite values")
        self.length = vec.shape[0]
        return vec

    def _discard(self, path: Path, why: str) -> None:
        log.warning("feature cache entry %s is damaged (%s); computing it again", path, why)
        path.unlink(missing_ok=True)

    def put(self, sha: str, vec: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, vec.astype(np.float32), allow_pickle=False)
        write_bytes(self._path(sha), buf.getvalue())


@dataclass
class Extracted:
    computed: int  # features that went through the backbone (the rest came from the cache)
    rate: float | None  # images per second over those


class Features:
    """A backbone's features for any list of images, through its cache; the engine (and the ONNX
    export it may need) is only built when some image is not cached yet."""

    def __init__(
        self,
        backbone: Backbone,
        runtime: str,
        cache_dir: str | Path,
        batch_size: int = 32,
        opset: int = OPSET,
        runner: EngineParams | None = None,
        run_shards: Callable | None = None,
    ):
        self.backbone, self.runtime, self.opset = backbone, resolve_runtime(runtime), opset
        self.cache_dir, self.batch_size, self._engine = Path(cache_dir), batch_size, None
        self.runner = runner or EngineParams()  # local: this process; else sharded (headstart.shards)
        # maps the shards over workers: Prefect's task runners, which the library never imports (DESIGN);
        # default headstart.shards.SHARD_MAP, which flows.shards sets when the flow or `headstart stage`
        # imports it
        self.run_shards = run_shards
        self.shared = 0  # features the domain probe put in the cache
        # runtimes differ in the last bits: each keeps its own features, so re-runs are exact
        key = feature_key(backbone, self.runtime, opset)
        self.cache = FeatureCache(cache_dir, key, backbone.num_features)

    @property
    def engine(self) -> TorchEngine | OrtEngine:
        if self._engine is None:
            self._engine = make_engine(self.backbone, self.runtime, self.cache_dir, opset=self.opset)
        return self._engine

    def for_training(self, train, val, k: int, seed: int) -> tuple[tuple, Extracted]:
        """(train features, their K augmented views, val features) for (rows, paths) of each split,
        and how many were computed (not read from the cache) at what rate."""
        out, computed, seconds = [], 0, 0.0
        for (rows, paths), views in ((train, k), (val, None)):
            shas = list(rows["sha256"])
            start = time.perf_counter()
            x, n = self(paths, shas, desc="features (train)" if views is not None else "features (val)")
            out.append(x)
            if views is not None:
                v, m = self.views(paths, shas, views, seed)
                out.append(v)
                n += m
            computed, seconds = computed + n, seconds + (time.perf_counter() - start if n else 0.0)
        return tuple(out), Extracted(computed, computed / seconds if computed else None)

    def views(self, paths: list[Path], shas: list[str], k: int, seed: int) -> tuple[np.ndarray, int]:
        """Features of K augmented views per image (preprocess.augment), each cached under its own
        key like any image, so epochs that sample them cost no backbone pass: (n, K, F), computed."""
        if k == 0 or not shas:
            return np.zeros((len(shas), k, self.backbone.num_features), np.float32), 0
        tag = provenance.derive_key("views", seed, provenance.code_hash("headstart.preprocess"))[:12]
        keys = [f"{s}.view{v}-{tag}" for s in shas for v in range(k)]
        items = [(p, view_seed(seed, s, v)) for p, s in zip(paths, shas, strict=True) for v in range(k)]
        found, todo = _lookup(self.cache, items, keys)
        load = partial(view_pixels, spec=self.backbone.spec)
        if todo and self.runner.runner != "local":
            self._sharded(todo, found, load)
        elif todo:
            spec = self.backbone.spec
            _compute(
                self.engine, spec, todo, found, self.cache, self.batch_size, "augmented views", load=load
            )
        x = np.stack([found[key] for key in keys]).astype(np.float32)
        return x.reshape(len(shas), k, -1), len(todo)

    def probe(
        self, probe: Probe, paths: list[Path], shas: list[str]
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """One pass of the domain probe (headstart.domain.Probe) over the images, yielding each
        (preprocessed batch, probe outputs). The features it computes on the way fill the cache for
        images not cached yet, so feature extraction later does not pass them through the backbone
        again. On onnxruntime the probe graph is fused differently from the extraction graph, so
        its features may differ from it in the sixth significant digit; cached entries are never
        overwritten, so a re-run reads the same values. The engine is made now, not at the first
        batch: on onnxruntime it gives `probe.layers` from the cached graph before `analyse` asks."""
        engine = make_engine(self.backbone, self.runtime, self.cache_dir, probe=probe, opset=self.opset)
        return self._probe_pass(engine, paths, shas)

    def _probe_pass(self, engine, paths: list[Path], shas: list[str]) -> Iterator:
        items = list(zip(shas, paths, strict=True))
        for batch, x in decoded(self.backbone.spec, items, self.batch_size, "domain probe"):
            out = engine(x)
            for (sha, _), vec in zip(batch, out[0], strict=True):
                if sha not in self.cache:
                    self.cache.put(sha, vec)
                    self.shared += 1
            yield x, out

    def __call__(self, paths: list[Path], shas: list[str], desc: str = "features") -> tuple[np.ndarray, int]:
        """(features, how many were computed rather than read from the cache)."""
        if not shas:
            return np.zeros((0, self.backbone.num_features), np.float32), 0
        found, todo = _lookup(self.cache, paths, shas)
        if todo and self.runner.runner != "local":
            self._sharded(todo, found)
        elif todo:
            _compute(self.engine, self.backbone.spec, todo, found, self.cache, self.batch_size, desc)
        return np.stack([found[s] for s in shas]).astype(np.float32), len(todo)

    def _sharded(self, todo: list[tuple], found: dict, load=None) -> None:
        """Compute `todo` on engine.runner's workers (run_shards), which write the cache; read
        their features back from it into `found`. The probe pass stays in this process: its sample is
        bounded (domain.max_images) and `analyse` needs every image's statistics here."""
        from headstart import shards

        if self.runtime != "onnxruntime":
            raise HeadstartError(
                f"engine.runner {self.runner.runner} runs onnxruntime in its workers, but the features "
                f"runtime is {self.runtime}: set train_head.runtime=onnxruntime or engine.runner=local"
            )
        run = self.run_shards or shards.SHARD_MAP
        if run is None:
            raise HeadstartError(
                f"engine.runner {self.runner.runner}: no shard map (import flows.shards, as `headstart run` "
                "and `headstart stage` do); set engine.runner=local to extract in this process"
            )
        # the workers (perhaps other machines) see project.cache_dir, not this user's cache
        onnx = in_project(backbone_onnx(self.backbone, self.cache_dir, self.opset), self.cache_dir)
        job = shards.Job(
            str(onnx.resolve()),
            str(self.cache_dir.resolve()),
            self.cache.dir.name,
            self.backbone.num_features,
            self.backbone.spec,
            self.batch_size,
            shards.threads_per_worker(self.runner),
            load,
        )
        run(job, shards.split(todo, self.runner.shard_size), self.runner)
        for key, _ in todo:
            vec = self.cache.get(key)
            if vec is None:
                raise HeadstartError(
                    f"engine.runner {self.runner.runner}: a worker returned {key} but "
                    f"{self.cache.dir} has no intact entry for it; check that every "
                    "worker sees project.cache_dir at the same path"
                )
            found[key] = vec


def view_pixels(item: tuple[Path, int], spec: InputSpec) -> np.ndarray:
    """One augmented view's pixels from its (path, view seed): picklable, for sharded workers."""
    return load_view(item[0], spec, item[1])


def view_seed(seed: int, sha: str, view: int) -> int:
    """The augmentation seed of one view: the run's seed, the image's content, the view's number."""
    return int(hashlib.sha256(f"{seed}|{sha}|{view}".encode()).hexdigest()[:15], 16)


def extract_features(
    engine,
    spec: InputSpec,
    paths: list[Path],
    shas: list[str],
    cache: FeatureCache,
    batch_size: int = 32,
    desc: str = "features",
    workers: int | None = None,
    prefetch: int = 2,
) -> tuple[np.ndarray, int]:
    """Features for each image, computing only those not cached; returns (features, n_computed)."""
    if isinstance(engine, nn.Module):
        engine = TorchEngine(engine)
    found, todo = _lookup(cache, paths, shas)
    _compute(engine, spec, todo, found, cache, batch_size, desc, workers, prefetch)
    return np.stack([found[s] for s in shas]).astype(np.float32), len(todo)


def _lookup(cache: FeatureCache, paths: list[Path], shas: list[str]) -> tuple[dict, list[tuple[str, Path]]]:
    """(sha -> cached features, [(sha, path)] still to compute, each content once)."""
    found = {s: v for s in dict.fromkeys(shas) if (v := cache.get(s)) is not None}
    return found, list({s: p for p, s in zip(paths, shas, strict=True) if s not in found}.items())


def _compute(
    engine,
    spec: InputSpec,
    todo,
    found: dict,
    cache: FeatureCache,
    batch_size: int,
    desc: str,
    workers: int | None = None,
    prefetch: int = 2,
    load=None,
) -> None:
    """Run the engine on `todo`, decoding a few batches ahead in threads; fill `found` and the cache."""
    for batch, x in decoded(spec, todo, batch_size, desc, workers, prefetch, load):
        for (sha, _), vec in zip(batch, engine(x), strict=True):
            cache.put(sha, vec)
            found[sha] = vec


def _named(load):
    """`load` whose decoding errors name the file: validate quarantined what it could not decode, so
    one failing here changed since; a HeadstartError (one line, never retried as transient)."""

    def named(source):
        try:
            return load(source)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for broken files
            path = source[0] if isinstance(source, tuple) else source
            raise HeadstartError(
                f"{path} cannot be decoded ({type(exc).__name__}: {str(exc)[:200]}); it changed after "
                "validate checked it: run prepare and validate again (validate quarantines it)"
            ) from None

    return named


def decoded(
    spec: InputSpec,
    items,
    batch_size: int,
    desc: str,
    workers: int | None = None,
    prefetch: int = 2,
    load=None,
) -> Iterator[tuple[list, np.ndarray]]:
    """(batch of (key, source), preprocessed pixels), decoding `prefetch` batches ahead in threads;
    `load(source)` makes one image's pixels (default: the file at path `source`, eval preprocessing)."""
    load = _named(load or (lambda path: load_image(path, spec)))
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    workers = workers or max(1, (os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not items) as bar,
    ):
        pending: deque = deque()
        for i, batch in enumerate(batches):
            while len(pending) <= prefetch and i + len(pending) < len(batches):
                ahead = batches[i + len(pending)]
                pending.append([pool.submit(load, p) for _, p in ahead])
            yield batch, np.stack([f.result() for f in pending.popleft()])
            bar.update(len(batch))
