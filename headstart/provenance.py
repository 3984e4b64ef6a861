"""What produced a cached value: the package version, the source of the code that computed it, the
versions of the libraries it ran on and the params it read. Every cache key and the scheduled run's
skip fingerprint are derived from these, so a code fix or a library upgrade is a cache miss by
construction, never a constant someone must remember to bump."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import headstart

LIBRARIES = ("torch", "onnxruntime-gpu", "pillow", "numpy", "onnx")
PACKAGES = ("headstart", "tasks", "flows")  # a run's result depends on all of its code


@functools.cache
def code_hash(*modules: str) -> str:
    """sha256 of the named modules' source; a package counts as every *.py under its folder.
    Found via importlib, so nothing heavy is imported (find_spec imports parent packages only)."""
    digest = hashlib.sha256()
    for name in modules:
        for rel, data in _sources(name):
            digest.update(f"{name}:{rel}:{len(data)}\n".encode())
            digest.update(data)
    return digest.hexdigest()[:20]


def _sources(module: str) -> list[tuple[str, bytes]]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return [("<not found>", b"")]  # still part of the key: finding it later changes the hash
    if spec.submodule_search_locations:
        files = [(d, p) for d in map(Path, spec.submodule_search_locations) for p in d.rglob("*.py")]
        return sorted((p.relative_to(d).as_posix(), p.read_bytes()) for d, p in files)
    return [(Path(spec.origin).name, Path(spec.origin).read_bytes())]


def library_versions(*dists: str) -> dict[str, str]:
    """{distribution: installed version}, "absent" for one not installed (default: LIBRARIES)."""
    out = {}
    for dist in dists or LIBRARIES:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def derive_key(*parts) -> str:
    """A short stable digest of JSON-serialisable parts, always with the package version."""
    text = json.dumps([headstart.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_fingerprint(cfg, data_hash: str) -> dict:
    """What a training run's result depends on: {"fingerprint": hex, "parts": {data_hash, params
    (all but schedule.*), code (every module of the package), libraries, version}}."""
    from headstart.config import flatten

    parts = {
        "data_hash": data_hash,
        "params": {k: v for k, v in flatten(cfg).items() if not k.startswith("schedule.")},
        "code": code_hash(*PACKAGES),
        "libraries": library_versions(),
        "version": headstart.__version__,
    }
    return {"fingerprint": derive_key(parts), "parts": parts}


def fingerprint_changes(old_parts: dict, new_parts: dict) -> list[str]:
    """What differs between two runs' fingerprint parts, e.g. ["code", "params: train_head.hidden",
    "library torch 2.14.1 -> 2.15.0"]; empty when nothing does."""
    if not old_parts:
        return ["the last successful run recorded no fingerprint"]
    changes = []
    for part, old, new in _diff(old_parts, new_parts):
        if part == "params":
            changes += [f"params: {k}" for k, _, _ in _diff(old, new)]
        elif part == "libraries":
            changes += [f"library {d} {a or 'absent'} -> {b or 'absent'}" for d, a, b in _diff(old, new)]
        elif part == "version":
            changes.append(f"headstart {old} -> {new}")
        elif part == "deps":  # a stage's input files (headstart.reuse)
            changes += [f"input {k}" for k, _, _ in _diff(old, new)]
        else:
            changes.append("data" if part == "data_hash" else part)
    return changes


def _diff(old: dict | None, new: dict | None) -> list[tuple[str, object, object]]:
    old, new = old or {}, new or {}
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def git_commit() -> str:
    """The project checkout's commit, "-dirty" when tracked files changed; "unknown" outside git."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def serving_requirements() -> list[str]:
    """What serving the ONNX model needs (headstart.runtime), pinned to what produced it."""
    return [f"{name}=={v}" for name, v in library_versions("onnxruntime-gpu", "numpy", "pillow").items()]
