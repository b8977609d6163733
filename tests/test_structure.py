"""The package's shape (design.md, "Layers"): no import circles, layers point down only, the runtime never imports
the offline pipeline, heavy libraries load only inside the module that needs them, modules stay small.

Every import counts, also those inside functions and under TYPE_CHECKING: a circle there is still two modules that
cannot be understood apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "edge_llama"
# Lower layers never import upper ones. A module's layer is its first matching prefix; lower number = lower layer.
LAYERS = [
    (0, ("edge_llama", "edge_llama.errors", "edge_llama.config", "edge_llama.manifest", "edge_llama.protocol",
         "edge_llama.jetson")),
    (1, ("edge_llama.engine",)),
    (2, ("edge_llama.structured",)),
    (3, ("edge_llama.prompting", "edge_llama.safety")),
    (4, ("edge_llama.pipeline",)),
    (5, ("edge_llama.service",)),
    (6, ("edge_llama.client", "edge_llama.launch")),
    (7, ("edge_llama.chat", "edge_llama.voice", "edge_llama.wyoming", "edge_llama.doctor")),
    (8, ("edge_llama.cli", "edge_llama.__main__")),
]
HEAVY = ("tensorrt_llm", "tensorrt", "modelopt", "torch", "transformers", "llama_cpp", "onnxruntime", "pycuda",
         "sounddevice", "faster_whisper", "piper", "llguidance", "wyoming", "ctranslate2", "h11", "prometheus_client")


def module_name(path: Path) -> str:
    name = ".".join(("edge_llama", *path.relative_to(PACKAGE).with_suffix("").parts))
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names]
    return found


def layer(name: str) -> int:
    best = (-1, -1)
    for number, prefixes in LAYERS:
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = (number, len(prefix))
    assert best[0] >= 0, f"{name} has no layer in tests/test_structure.py"
    return best[0]


GRAPH = {name: {target for target, _ in imports(path) if target in MODULES and target != name}
         for name, path in MODULES.items()}


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                circles.append(sorted([v, *component]))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert circles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_point_down(name: str) -> None:
    upward = [target for target in GRAPH[name] if target != "edge_llama" and layer(target) > layer(name)
              and not target.startswith(name + ".")]
    assert upward == [], f"{name} (layer {layer(name)}) imports upper layers"


def test_the_runtime_never_imports_the_pipeline() -> None:
    runtime = [n for n in MODULES if n.startswith(("edge_llama.engine", "edge_llama.service"))]
    assert [(n, t) for n in runtime for t in GRAPH[n] if t.startswith("edge_llama.pipeline")] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_heavy_libraries_load_only_where_they_are_used(name: str) -> None:
    """At module level only in a module that is itself loaded on demand (named in HEAVY_HOMES)."""
    top = {target.split(".")[0] for target, at_top in imports(MODULES[name]) if at_top}
    assert not top & set(HEAVY) or name.startswith(HEAVY_HOMES), f"{name} imports {sorted(top & set(HEAVY))} at load"


# Modules that import a heavy library at module level, and are themselves imported only by the code that needs
# them (checked: none of the modules the daemon or CLI imports at start is among them).
HEAVY_HOMES = ("edge_llama.service.http", "edge_llama.service.routes", "edge_llama.wyoming")


def test_the_modules_loaded_at_start_are_light() -> None:
    """What `edge-llama serve` and `edge-llama chat` import before any request: no heavy library, no HTTP."""
    seen: set[str] = set()
    todo = ["edge_llama.cli", "edge_llama.service.daemon", "edge_llama.chat"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [t for t, at_top in imports(MODULES[name]) if at_top and t in MODULES]
    assert [name for name in seen if name.startswith(HEAVY_HOMES)] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 600, f"{name} has {lines} lines: split it by concern"
