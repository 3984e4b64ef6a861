"""headstart.provenance: code hashes, library versions, derived keys, the run fingerprint and its diff."""

from __future__ import annotations

import sys

import pytest

import headstart
from headstart import provenance
from headstart.config import load_params
from headstart.provenance import (
    code_hash,
    derive_key,
    fingerprint_changes,
    library_versions,
    run_fingerprint,
)


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A throwaway package `hs_probe_pkg` (two modules) on sys.path; code_hash's memo cleared around it."""
    root = tmp_path / "hs_probe_pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("X = 1\n")
    (root / "b.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code_hash.cache_clear()
    yield root
    code_hash.cache_clear()


def test_code_hash_follows_the_source_and_imports_nothing(pkg):
    whole, a, b = code_hash("hs_probe_pkg"), code_hash("hs_probe_pkg.a"), code_hash("hs_probe_pkg.b")
    assert len({whole, a, b}) == 3 and len(a) >= 16 and code_hash("hs_probe_pkg.a") == a
    assert "hs_probe_pkg.b" not in sys.modules and "hs_probe_pkg.a" not in sys.modules
    (pkg / "a.py").write_text("X = 2\n")
    assert code_hash("hs_probe_pkg.a") == a  # memoised for the process: a run sees one code
    code_hash.cache_clear()
    assert code_hash("hs_probe_pkg.a") != a and code_hash("hs_probe_pkg.b") == b
    assert code_hash("hs_probe_pkg") != whole  # a package is every module under it
    (pkg / "sub").mkdir()
    (pkg / "sub" / "c.py").write_text("")
    before = code_hash("hs_probe_pkg")
    code_hash.cache_clear()
    assert code_hash("hs_probe_pkg") != before  # a new module counts too


def test_code_hash_of_real_modules_does_not_import_torch():
    import subprocess

    code = (
        "import sys; from headstart.provenance import code_hash; "
        "code_hash('headstart', 'tasks', 'flows', 'headstart.features', 'headstart.export'); "
        "print(sorted(m for m in ('torch', 'onnx', 'mlflow', 'prefect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_versions():
    versions = library_versions()
    assert set(versions) == {"torch", "onnxruntime-gpu", "pillow", "numpy", "onnx"}
    assert versions["numpy"] == __import__("numpy").__version__
    assert library_versions("numpy", "no-such-dist-hs") == {
        "numpy": versions["numpy"],
        "no-such-dist-hs": "absent",
    }


def test_derive_key_is_stable_and_carries_the_package_version(monkeypatch):
    key = derive_key("a", {"x": 1, "y": [1, 2]})
    assert key == derive_key("a", {"y": [1, 2], "x": 1}) and len(key) == 16
    assert derive_key("a", {"x": 2, "y": [1, 2]}) != key and derive_key("b", {"x": 1, "y": [1, 2]}) != key
    monkeypatch.setattr(headstart, "__version__", "99.0.0")
    assert derive_key("a", {"x": 1, "y": [1, 2]}) != key


def test_run_fingerprint_parts_and_what_changes_it(monkeypatch):
    cfg = load_params(None)
    fp = run_fingerprint(cfg, "d" * 64)
    parts = fp["parts"]
    assert set(parts) == {"data_hash", "params", "code", "libraries", "version"}
    assert parts["data_hash"] == "d" * 64 and parts["libraries"] == library_versions()
    assert "train_head.hidden" in parts["params"] and not any(
        k.startswith("schedule.") for k in parts["params"]
    )
    assert run_fingerprint(cfg, "d" * 64) == fp
    # a schedule setting is not what a model depends on
    assert run_fingerprint(load_params(None, ["schedule.retries=5"]), "d" * 64) == fp

    def changes(new) -> list[str]:
        assert new["fingerprint"] != fp["fingerprint"]
        return fingerprint_changes(parts, new["parts"])

    assert changes(run_fingerprint(cfg, "e" * 64)) == ["data"]
    assert changes(run_fingerprint(load_params(None, ["train_head.hidden=16"]), "d" * 64)) == [
        "params: train_head.hidden"
    ]
    with monkeypatch.context() as m:
        m.setattr(provenance, "code_hash", lambda *mods: "edited")
        assert changes(run_fingerprint(cfg, "d" * 64)) == ["code"]
    real = provenance.version
    with monkeypatch.context() as m:
        m.setattr(provenance, "version", lambda d: "1.32.0" if d == "onnxruntime-gpu" else real(d))
        old = parts["libraries"]["onnxruntime-gpu"]
        assert changes(run_fingerprint(cfg, "d" * 64)) == [f"library onnxruntime-gpu {old} -> 1.32.0"]
    with monkeypatch.context() as m:
        m.setattr(headstart, "__version__", "99.0.0")
        assert changes(run_fingerprint(cfg, "d" * 64)) == [f"headstart {parts['version']} -> 99.0.0"]
    assert fingerprint_changes(parts, parts) == []


def test_fingerprint_changes_names_each_part():
    old = {
        "data_hash": "a",
        "params": {"p.x": "1", "p.gone": "2"},
        "code": "c1",
        "libraries": {"torch": "2.14.1", "numpy": "2.4.6"},
    }
    new = {
        "data_hash": "b",
        "params": {"p.x": "3", "p.new": "4"},
        "code": "c2",
        "libraries": {"torch": "2.15.0", "pillow": "13.0.0"},
    }
    assert fingerprint_changes(old, new) == [
        "code",
        "data",
        "library numpy 2.4.6 -> absent",
        "library pillow absent -> 13.0.0",
        "library torch 2.14.1 -> 2.15.0",
        "params: p.gone",
        "params: p.new",
        "params: p.x",
    ]
    # a state file written before fingerprints had parts: nothing to compare, so it retrains
    assert fingerprint_changes({}, new) == ["the last successful run recorded no fingerprint"]
