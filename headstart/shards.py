"""Sharded feature extraction, the worker's side: the images that miss the feature cache, split into
shards by content hash; each worker process opens the cached ONNX engine once (sessions are not
picklable: a per-process global holds it), writes its shard's features to the shared feature cache and
returns keys and counts, so arrays never travel through the orchestrator. Mapping the shards over
workers is Prefect's task runners' job: flows/shards.py (the library never imports Prefect).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headstart.config import EngineParams
from headstart.preprocess import InputSpec

# the ORT session of each engine file and thread count, built once per worker process
_ENGINES: dict[tuple[str, int], object] = {}


# the default shard map of every Features: run(job, shards, engine_params) -> results. flows.shards
# sets it when imported (use_shard_map); it lives here, not in headstart.features, so that setting it
# imports neither torch nor the feature code (a flow run whose stages are all reused imports no torch)
SHARD_MAP: Callable | None = None


def use_shard_map(run: Callable) -> None:
    """Set the default `run_shards` of every Features."""
    global SHARD_MAP
    SHARD_MAP = run


@dataclass(frozen=True)
class Job:
    """What a worker needs for any shard of one extraction: file paths and numbers, all picklable."""

    onnx: str  # the engine, exported once by the caller into the shared cache
    cache_root: str
    cache_key: str
    length: int
    spec: InputSpec
    batch_size: int
    threads: int  # onnxruntime's intra-op threads and the decoding threads of one worker
    load: Callable | None = None  # one item's source -> pixels (picklable); None: the file, eval transform


def split(todo: list[tuple], size: int) -> list[list[tuple]]:
    """Shards of at most `size` items, ordered by key (the content hash): the same images give the
    same shards on every run and every runner."""
    ordered = sorted(todo, key=lambda item: item[0])
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def extract_shard(job: Job, items: list[tuple]) -> dict:
    """Compute one shard's features into the cache; entries already there (a retried shard's earlier
    attempt, another worker's) are kept, not computed again. Returns keys and counts only."""
    from headstart.features import FeatureCache, _compute

    cache = FeatureCache(job.cache_root, job.cache_key, job.length)
    todo = [(k, s) for k, s in items if cache.get(k) is None]
    if todo:
        engine = _engine(job.onnx, job.threads)
        _compute(engine, job.spec, todo, {}, cache, job.batch_size, "shard", job.threads, load=job.load)
    return {"keys": [k for k, _ in items], "computed": len(todo), "pid": os.getpid()}


def _engine(onnx: str, threads: int):
    from headstart.features import OrtEngine

    if (onnx, threads) not in _ENGINES:
        _ENGINES[(onnx, threads)] = OrtEngine(Path(onnx), threads)
    return _ENGINES[(onnx, threads)]


def threads_per_worker(p: EngineParams) -> int:
    """engine.threads, or this machine's cores shared among engine.workers."""
    return p.threads or max(1, (os.cpu_count() or 1) // p.workers)
