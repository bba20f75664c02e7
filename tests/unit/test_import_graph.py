"""The package's import structure: the two training engines sit below one factory (``lmfusion.training.engines``)
without an import cycle, counting imports inside functions too (a lazy import hides a cycle from the interpreter,
not from the reader), and no library module imports another's private name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lmfusion", "megatron_ext", "data_tools")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every absolute import in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _imports(path):
            deps |= {resolve(f"{module}.{n}") for n in names} if names else {resolve(module)}
        graph[name] = deps - {None, name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    """E.g. trainer.py must not import the DeepSpeed engine, which subclasses its Trainer (lazily or not)."""
    assert _cycles(_graph()) == []


def test_no_private_names_across_modules():
    modules = _modules()
    found = []
    for name, path in modules.items():
        for module, names in _imports(path):
            if module.split(".")[0] in PACKAGES and module != name:
                found += [f"{name}: from {module} import {n}" for n in names if n.startswith("_")
                          and not n.startswith("__")]
    assert found == []


@pytest.mark.parametrize("module", ["lmfusion.training.deepspeed_engine", "lmfusion.training.trainer",
                                    "lmfusion.training.engines", "lmfusion.training.model_setup",
                                    "lmfusion.training.checkpointing"])
def test_imports_first_in_a_fresh_interpreter(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
