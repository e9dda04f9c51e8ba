"""The training package's import graph (module-level and function-level imports alike) has no cycle, and the
library modules do not import CLI entry points or teacher sources they do not need."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_graph(package="training"):
    """{module: set of package modules it imports}, from the source (no import runs)."""
    paths = {}
    for folder, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                paths[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in paths.items():
        here = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = here.split(".")
                target = node.module or ""
                if node.level:
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in found if m in paths and m != module}
    return graph


def nested(a, b):
    """A package and its own submodules import each other by design (lazy exports)."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def cycles(graph):
    out = set()
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nested(node, nxt):
                    continue
                if nxt == start:
                    out.add(tuple(sorted(path)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == set()


def test_no_import_cycles_in_training():
    assert cycles(import_graph()) == set()


@pytest.mark.parametrize("module, forbidden", [
    ("training.trainers.distillation_config", "training.teachers"),
    ("training.teachers.cached", "training.teachers.cache.build"),
    ("training.data.shards", "training.data.preprocess"),
])
def test_library_modules_do_not_import_what_they_do_not_need(module, forbidden):
    imported = import_graph()[module]
    assert not {m for m in imported if m == forbidden or m.startswith(forbidden + ".")}, imported
