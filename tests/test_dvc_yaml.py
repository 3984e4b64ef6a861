"""dvc.yaml against the code: DVC reruns a stage only when a declared input changed, so every module a
stage's task imports (transitively), every param it reads and every file it exchanges with other
stages must be declared, or `dvc repro` silently reuses stale outputs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from headstart.config import Params
from headstart.reuse import closure  # the same closure keys the flow's stage reuse
from headstart.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
ART, DATA = "${project.artifacts_dir}/", "${prepare.data_dir}"
# paths and operations, not inputs of a result: the data folder is a dep of its own
NOT_PARAMS = {("project", "artifacts_dir"), ("project", "cache_dir"), ("prepare", "data_dir")}
NOT_SECTIONS = {"schedule", "server"}


def params_read(path: Path) -> set[tuple[str, str | None]]:
    """(section, key or None for the whole section) for every `cfg.section.key` / `params...`, and
    through aliases such as `p = cfg.finetune` (a bare alias passed on counts as the whole section)."""
    tree = ast.parse(path.read_text())
    sections = set(Params.model_fields)
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    aliases: dict[str, str] = {}
    making: set[ast.AST] = set()  # `cfg.section` nodes that make an alias: the alias's uses count
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for t, v in zip(targets, values, strict=False):
                if isinstance(t, ast.Name) and _section(v, sections):
                    aliases[t.id] = _section(v, sections)
                    making.add(v)
    found = set()
    for node in ast.walk(tree):
        section = _section(node, sections) or (
            aliases.get(node.id) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) else None
        )
        if section is None or node in making:
            continue
        up = parent.get(node)
        found.add((section, up.attr if isinstance(up, ast.Attribute) and up.value is node else None))
    return {(s, k) for s, k in found if s not in NOT_SECTIONS and (s, k) not in NOT_PARAMS}


def _section(node: ast.AST, sections: set[str]) -> str | None:
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("cfg", "params")
        and node.attr in sections
    ):
        return node.attr
    return None


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_every_stage_of_the_list_is_a_dvc_stage_and_nothing_else(dvc):
    assert list(dvc) == [s.name for s in STAGES]
    for s in STAGES:
        assert dvc[s.name]["cmd"] == f"headstart stage {s.name}"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dvc_declares_what_the_stage_exchanges(dvc, stage):
    d = dvc[stage.name]
    outs = _paths(d.get("outs")) | _paths(d.get("metrics")) | _paths(d.get("plots"))
    assert outs == {ART + o for o in stage.outs}, "outs differ from headstart/stages.py"
    deps = _paths(d.get("deps"))
    missing = {ART + x for x in stage.deps} - deps
    assert not missing, f"dvc.yaml {stage.name}: deps miss files of earlier stages: {sorted(missing)}"
    assert (DATA in deps) == stage.reads_data, f"{stage.name}: the data folder as a dep"
    assert set(d.get("params", [])) == set(stage.params), "params differ from headstart/stages.py"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dvc_deps_cover_every_module_the_stage_imports(dvc, stage):
    deps = _paths(dvc[stage.name].get("deps"))
    needed = {str(p.relative_to(ROOT)) for p in closure(stage)} | set(stage.files)
    uncovered = sorted(
        n for n in needed if not any(n == d or n.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert not uncovered, f"dvc.yaml {stage.name}: deps miss code it runs: {uncovered}"
    stale = sorted(d for d in deps if not d.startswith("$") and not (ROOT / d).exists())
    assert not stale, f"dvc.yaml {stage.name}: deps that do not exist: {stale}"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_stage_params_cover_every_param_its_code_reads(stage):
    read = set().union(*(params_read(p) for p in closure(stage)))
    declared = set(stage.params) | set(stage.reports_to)
    uncovered = sorted(
        f"{s}.{k}" if k else s
        for s, k in read
        if s not in declared and (k is None or f"{s}.{k}" not in declared)
    )
    assert not uncovered, (
        f"{stage.name} reads params that neither stages.py nor dvc.yaml declare: {uncovered}"
    )


def test_the_check_fails_when_a_dep_is_removed(dvc):
    """The checks above can fail: dvc.yaml without one module its task imports."""
    stage = next(s for s in STAGES if s.name == "evaluate")
    broken = {
        **dvc,
        "evaluate": {
            **dvc["evaluate"],
            "deps": [d for d in dvc["evaluate"]["deps"] if d != "headstart/training.py"],
        },
    }
    with pytest.raises(AssertionError, match="headstart/training.py"):
        test_dvc_deps_cover_every_module_the_stage_imports(broken, stage)
    assert {p.name for p in closure(stage)} >= {"training.py", "features.py", "metrics.py"}
    assert ("train_head", "runtime") in params_read(ROOT / "tasks" / "evaluate.py")
