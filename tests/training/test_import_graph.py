"""The project's import graph, read from the source (nothing is imported): `hf_retnet`, `training` with every
subpackage, and `model_cards`. Imports at module level and inside functions count alike.

- No cycle between any two modules. A package's `__init__` may import its own submodules lazily (the public names
  load on first use), so those edges do not count; an eager one does.
- No cycle between any two packages, where a package imports another when any module in it (its subpackages
  included) imports a module of the other. A package and its own subpackages are one unit at this level (the cached
  teacher reads `teachers.cache`'s format, the cache builder runs `teachers.direct`); the module rule holds them.
- Each dependency rule of DESIGN.md, one test each, plus the layout's own: library code never imports the command
  shims and deprecated aliases left at the top of `training/`.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass, field

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = ("hf_retnet", "training", "model_cards")

# The one cycle DESIGN.md asks for: `RetNetForCausalLM.from_llama` reaches its converter from inside the method, in a
# try/except ImportError that the Hub's remote-code loader skips, so a checkpoint's modeling file never needs it.
OPTIONAL_CONVERTER_IMPORTS = {("hf_retnet.modeling_retnet", "hf_retnet.convert_llama")}


@dataclass
class Graph:
    modules: dict[str, str] = field(default_factory=dict)  # module -> file
    packages: set[str] = field(default_factory=set)  # modules that are packages (an __init__.py)
    edges: dict[tuple[str, str], dict] = field(default_factory=dict)  # (importer, imported) -> {"eager", "optional"}

    def imports(self, module: str) -> set[str]:
        return {b for (a, b) in self.edges if a == module}


def _guarded(node, parents) -> bool:
    """Inside a `try:` whose handlers catch ImportError (what transformers' remote-code loader leaves out)."""
    for parent in parents:
        if isinstance(parent, ast.Try) and node_in(node, parent.body):
            for handler in parent.handlers:
                names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def node_in(node, body) -> bool:
    return any(node is sub for stmt in body for sub in ast.walk(stmt))


def scan(root: str, packages=PROJECT) -> Graph:
    """Every module of `packages` under `root` and the project modules each imports."""
    graph = Graph()
    for package in packages:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    if name == "__init__.py":
                        module = module.removesuffix(".__init__")
                        graph.packages.add(module)
                    graph.modules[module] = path
    for module, path in graph.modules.items():
        here = module if module in graph.packages else module.rpartition(".")[0]
        tree = ast.parse(open(path, encoding="utf-8").read())
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def ancestors(node):
            while node in parents:
                node = parents[node]
                yield node

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            chain = list(ancestors(node))
            eager = not any(isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for a in chain)
            optional = _guarded(node, chain)
            for target in targets:
                if target in graph.modules and target != module:
                    edge = graph.edges.setdefault((module, target), {"eager": False, "optional": True})
                    edge["eager"] |= eager
                    edge["optional"] &= optional
    return graph


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def nested(a: str, b: str) -> bool:
    return inside(a, b) or inside(b, a)


def strongly_connected(nodes, successors) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member, each sorted, sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(successors.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(out)


def module_edges(graph: Graph, allowed=frozenset()) -> dict[str, set[str]]:
    """The module graph the cycle rule reads: without a package's lazy imports of its own submodules, and without
    the `allowed` edges (each must stay a function-level import guarded by try/except ImportError)."""
    out: dict[str, set[str]] = {}
    for (a, b), kind in graph.edges.items():
        if a in graph.packages and inside(b, a) and not kind["eager"]:
            continue
        if (a, b) in allowed and kind["optional"] and not kind["eager"]:
            continue
        out.setdefault(a, set()).add(b)
    return out


def module_cycles(graph: Graph, allowed=frozenset()) -> list[list[str]]:
    return strongly_connected(graph.modules, module_edges(graph, allowed))


def package_edges(graph: Graph, allowed=frozenset()) -> dict[str, set[str]]:
    """P -> Q when a module in P (subpackages included) imports a module in Q, for P and Q not nested."""
    out: dict[str, set[str]] = {}
    for a, targets in module_edges(graph, allowed).items():
        for b in targets:
            for p in (q for q in graph.packages if inside(a, q)):
                for q in (q for q in graph.packages if inside(b, q)):
                    if not nested(p, q):
                        out.setdefault(p, set()).add(q)
    return out


def package_cycles(graph: Graph, allowed=frozenset()) -> list[list[str]]:
    return strongly_connected(graph.packages, package_edges(graph, allowed))


def closure(graph: Graph, start: str, eager_only: bool = False) -> set[str]:
    """Every project module importing `start` may import (module-level imports only with `eager_only`), the
    packages Python imports on the way to a module (their `__init__`) included."""
    seen, todo = {start}, [start]
    while todo:
        module = todo.pop()
        found = {b for (a, b), kind in graph.edges.items() if a == module and (kind["eager"] or not eager_only)}
        found |= {p for p in graph.packages if inside(module, p)}
        for b in found - seen:
            seen.add(b)
            todo.append(b)
    return seen - {start}


@pytest.fixture(scope="module")
def graph() -> Graph:
    return scan(REPO)


# ------------------------------------------------------------------------------------------------ the checker


def write_package(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_a_planted_module_cycle_and_a_package_cycle(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "def __getattr__(name):\n    from .a import A\n    return A\n",  # a lazy re-export
        "pkg/a.py": "from .b import B\nA = 1\n",
        "pkg/b.py": "def f():\n    from pkg.c import C\n",  # function-level imports count
        "pkg/c.py": "from . import a\nC = 1\n",  # a -> b -> c -> a
        "pkg/left/__init__.py": "",
        "pkg/left/x.py": "from ..right.y import Y\nX = 1\n",
        "pkg/right/__init__.py": "",
        "pkg/right/y.py": "Y = 1\n",
        "pkg/right/z.py": "from pkg.left import x\n",  # pkg.left <-> pkg.right, no module cycle
    })
    graph = scan(str(tmp_path), packages=("pkg",))
    assert graph.imports("pkg.b") == {"pkg.c"} and graph.imports("pkg.c") == {"pkg", "pkg.a"}
    assert module_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert package_cycles(graph) == [["pkg.left", "pkg.right"]]


def test_the_checker_leaves_lazy_exports_and_subpackages_alone_but_not_eager_cycles(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "def __getattr__(name):\n    from .sub import thing\n    return thing\n",
        "pkg/base.py": "BASE = 1\n",
        "pkg/sub/__init__.py": "from .thing import thing\n",
        "pkg/sub/thing.py": "from pkg.base import BASE\nfrom pkg import sub\nthing = BASE\n",
        "opt/__init__.py": "",
        "opt/model.py": "def f():\n    try:\n        from opt.conv import g\n    except ImportError:\n        raise\n",
        "opt/conv.py": "from opt.model import f\n",
    })
    graph = scan(str(tmp_path), packages=("pkg", "opt"))
    # pkg -> pkg.sub lazily, pkg.sub.thing -> pkg.base: a package and its subpackage, no cycle; but the eager
    # pkg.sub (__init__) -> pkg.sub.thing -> pkg.sub pair is one
    assert module_cycles(graph) == [["opt.conv", "opt.model"], ["pkg.sub", "pkg.sub.thing"]]
    assert package_cycles(graph) == []
    assert module_cycles(graph, allowed={("opt.model", "opt.conv")}) == [["pkg.sub", "pkg.sub.thing"]]


# ------------------------------------------------------------------------------------------------ the project


def test_every_project_module_is_in_the_graph(graph):
    assert {"hf_retnet.modeling_retnet", "training.trainers.distillation_trainer", "training.teachers.cache.build",
            "training.teachers.server.app", "training.hub.model_card", "training.utils.io", "model_cards"} <= set(
        graph.modules)
    assert {"training.trainers.callbacks", "training.teachers.server", "training.data", "training.demo"} <= graph.packages


def test_no_import_cycle_between_modules(graph):
    assert module_cycles(graph, OPTIONAL_CONVERTER_IMPORTS) == []


def test_the_one_allowed_cycle_stays_a_guarded_function_level_import(graph):
    for edge in OPTIONAL_CONVERTER_IMPORTS:
        assert graph.edges[edge] == {"eager": False, "optional": True}, edge


def test_no_import_cycle_between_packages(graph):
    assert package_cycles(graph, OPTIONAL_CONVERTER_IMPORTS) == []


def test_modeling_and_configuration_import_only_torch_transformers_and_each_other(graph):
    """What travels to the Hub with a checkpoint: the remote-code loader follows every import it finds (all but
    those in try/except ImportError), so those must be the standard library, torch, transformers or each other."""
    from transformers.dynamic_module_utils import get_imports

    own = {"hf_retnet.modeling_retnet", "hf_retnet.configuration_retnet"}
    for module in sorted(own):
        path = graph.modules[module]
        followed = set(get_imports(path))
        assert followed <= {"torch", "transformers"} | set(sys.stdlib_module_names), (module, followed)
        project = {b: kind for (a, b), kind in graph.edges.items() if a == module}
        for target, kind in project.items():
            assert target in own or ((module, target) in OPTIONAL_CONVERTER_IMPORTS and kind["optional"]), (
                module, target)


def test_hf_retnet_never_imports_training_or_model_cards(graph):
    bad = {(a, b) for (a, b) in graph.edges if inside(a, "hf_retnet") and not inside(b, "hf_retnet")}
    assert bad == set()


def test_model_cards_imports_no_code():
    folder = os.path.join(REPO, "model_cards")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], name
    assert os.path.isfile(os.path.join(folder, "retnet_student.md"))


def test_nothing_in_the_package_imports_bench_tests_or_examples(graph):
    bad = []
    for module, path in graph.modules.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [(module, n) for n in names if n.split(".")[0] in ("bench", "tests", "examples")]
    assert bad == []


@pytest.mark.parametrize("start", [
    "training.trainers.distillation_trainer", "training.trainers.distillation_config", "training.trainers.losses",
    "training.teachers", "training.data.shards",
])
def test_evaluation_and_the_model_card_stay_out_of_the_trainers_import_path(graph, start):
    """Not even lazily: nothing the trainer can import reaches the evaluation or the model card."""
    reached = closure(graph, start)
    assert not {m for m in reached if inside(m, "training.evaluation") or inside(m, "training.hub")
                or inside(m, "model_cards")}, sorted(reached)


@pytest.mark.parametrize("start", ["training.train", "training.trainers.distillation", "training.hub.push"])
def test_the_train_command_imports_the_model_card_only_when_it_pushes(graph, start):
    reached = closure(graph, start, eager_only=True)
    assert not {m for m in reached if inside(m, "training.evaluation") or inside(m, "training.hub.model_card")
                or inside(m, "model_cards")}, sorted(reached)


def test_library_code_never_imports_the_command_shims_or_the_aliases(graph):
    """The modules at the top of training/ (commands, deprecated aliases) and training/__init__ sit above all the
    subpackages: code in a subpackage imports the module that defines a name, never those."""
    top = {m for m in graph.modules if m.count(".") == 1 and inside(m, "training") and m not in graph.packages}
    top.add("training")
    library = {m for m in graph.modules if inside(m, "training")} - top
    assert {(a, b) for (a, b) in graph.edges if a in library and b in top} == set()
    for module in sorted(top - {"training"}):  # and they import library modules only, not each other
        assert not graph.imports(module) & top, (module, graph.imports(module))


@pytest.mark.parametrize("module, forbidden", [
    ("training.trainers.distillation_config", "training.teachers"),
    ("training.teachers.cached", "training.teachers.cache.build"),
    ("training.teachers.cache.format", "training.data.shards"),
    ("training.data.shards", "training.data.preprocess"),
    ("training.data.preprocess", "training.data.shards"),
    ("training.teachers.network", "training.teachers.server.app"),
    ("training.evaluation", "training.trainers"),
])
def test_library_modules_do_not_import_what_they_do_not_need(graph, module, forbidden):
    sources = [m for m in graph.modules if inside(m, module)]
    imported = {b for m in sources for b in graph.imports(m)}
    assert not {m for m in imported if inside(m, forbidden)}, imported


def test_utils_import_nothing_else_from_the_project(graph):
    bad = {(a, b) for (a, b) in graph.edges if inside(a, "training.utils") and not inside(b, "training.utils")}
    assert bad == set()
