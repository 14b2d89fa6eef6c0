"""The package's layers point one way: a module imports only its own package and the layers below it.

    errors  <  files, code, megatron_compat, extras  <  config  <  cli  <  data  <  model, schedule  <  blend  <  train
    <  export  <  eval  <  launch

Lazy imports inside functions count: a layer that reaches up, even lazily, is how cycles and the "export imports
eval imports export" tangles start. Within a package no module imports, through any chain, one that imports it back
(the layers cannot see that); within train, the backends never import the stage driver (train.run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "nano3"
LAYER = {"__init__": 0, "errors": 0, "files": 1, "code": 1, "megatron_compat": 1, "extras": 1, "config": 2, "cli": 3, "data": 4, "model": 5,
         "schedule": 5, "blend": 6, "train": 7, "export": 8, "eval": 9, "launch": 10}


def top(module: str) -> str:
    """`nano3.train.backends.reference` -> `train`; `nano3` itself -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nano3":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nano3")
    return found


def modules() -> list[tuple[str, Path]]:
    return [(".".join(("nano3", *p.relative_to(PACKAGE).with_suffix("").parts)), p) for p in PACKAGE.rglob("*.py")]


def test_every_top_level_module_and_package_has_a_layer():
    assert {top(m) for m, _ in modules()} <= set(LAYER), "a new package: give it a layer in LAYER (and in README)"


@pytest.mark.parametrize("module,path", modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down(module, path):
    mine = LAYER[top(module)]
    upward = sorted(i for i in imports(path) if top(i) in LAYER and top(i) != top(module) and LAYER[top(i)] >= mine
                    and top(i) != "__init__")
    assert not upward, f"{module} imports {upward}: a layer may import only layers below it"


def test_training_backends_and_entry_never_import_the_stage_driver():
    for module, path in modules():
        if module.startswith(("nano3.train.backends", "nano3.train.entry", "nano3.train.rundir")):
            assert not {i for i in imports(path) if i.startswith("nano3.train.run") and
                        not i.startswith("nano3.train.rundir")}, module


def module_graph(found: list[tuple[str, Path]]) -> dict[str, set[str]]:
    """Module -> the modules it imports (lazily too); a package is its `__init__`, `from a import b` is `a.b` where
    that is a module, else `a`."""
    names = {m.removesuffix(".__init__"): p for m, p in found}

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in names), None)

    return {m: {r for i in imports(p) if (r := resolve(i)) and r != m} for m, p in names.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_inside_any_package():
    assert circles(module_graph(modules())) == []


def test_the_circle_check_finds_a_circle_through_a_lazy_import_and_a_package(tmp_path):
    pkg = tmp_path / "nano3" / "train" / "backends"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def train():\n    from nano3.train.backends.gpu import go\n")
    (pkg / "gpu.py").write_text("from nano3.train import check\n")
    (tmp_path / "nano3" / "train" / "check.py").write_text("def f():\n    from nano3.train.backends import train\n")
    (tmp_path / "nano3" / "train" / "plain.py").write_text("from nano3.train import check\n")
    found = [(".".join(("nano3", *p.relative_to(tmp_path / "nano3").with_suffix("").parts)), p)
             for p in (tmp_path / "nano3").rglob("*.py")]
    assert circles(module_graph(found)) == [["nano3.train.backends", "nano3.train.backends.gpu", "nano3.train.check"]]


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from nano3.eval.eval import run\n")
    assert "nano3.eval.eval" in imports(bad)
    assert LAYER[top("nano3.eval.eval")] > LAYER["export"]


STAGES = ("sample", "tokenizer", "retrieval", "prep", "blend", "pretrain", "lc", "export", "eval")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_entry_is_stage_main_of_a_run(stage):
    """One stage convention: stages/<stage>.py hands `run(params, args) -> summary` to nano3.cli.stage_main."""
    import importlib
    import inspect

    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text())
    imported = {a.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "stage_main"]
    assert imported.get("stage_main") == "nano3.cli" and len(calls) == 1 and calls[0].args[0].id == "run"
    run = getattr(importlib.import_module(imported["run"]), "run")
    assert list(inspect.signature(run).parameters) == ["params", "args"]
    assert len([n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]) == 0, "logic belongs in run"


def test_every_stage_entry_is_run_in_the_module_named_after_the_stage():
    """Issue 35: one naming pattern. `stages/<stage>.py` calls `run(params, args)` of `nano3.<package>.<stage>`, so
    `make <stage>`'s code is found by its name; each stage keeps its own module, so DVC's deps stay the stage's own."""
    import importlib

    entries = sorted((ROOT / "stages").glob("*.py"))
    assert {e.stem for e in entries} >= {"sample", "tokenizer", "prep", "retrieval", "blend", "pretrain", "lc", "export",
                                         "eval"}
    for entry in entries:
        found = [node.module for node in ast.walk(ast.parse(entry.read_text()))
                 if isinstance(node, ast.ImportFrom) and any(a.name == "run" for a in node.names)]
        assert len(found) == 1, f"{entry.name}: imports run from {found}"
        package, module = found[0].split(".")[1:] if found[0].count(".") == 2 else (None, found[0])
        assert module == entry.stem and package in LAYER, f"{entry.name}: run comes from {found[0]}"
        assert callable(getattr(importlib.import_module(found[0]), "run"))
