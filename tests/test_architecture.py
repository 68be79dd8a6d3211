"""The house rules of docs/architecture.md, held against the code: small files, no import cycle, a root that holds
only the shared core, and a core that imports no capability."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moviepostproduction"
MAX_LINES = 400
ROOT_MODULES = {
    "__init__.py",  # the public API
    "scene.py",
    "layout.py",
    "sampling.py",
    "noise.py",  # starting noise drawn and packed as diffusers draws it (docs/sampling.md)
    "model_dir.py",
    "adapter_dir.py",  # the adapter folder beside a stock FLUX folder: its index, encoders, sampling defaults
    "sampling_defaults.py",  # SamplingDefaults / FlowShift: what a model dir or adapter names for sampling
    "devices.py",  # --device / --dtype auto and the one-line refusal of a device this machine lacks
    "errors.py",
    "files.py",  # safetensors / JSON files: atomic writes, checked reads (docs/architecture.md says why here)
    "resources.py",  # pre-flight memory bound and out-of-memory messages, shared by the CLI and the nodes
    "visualize.py",  # PNG writing, overlays, grids, curves: every command's pictures
}
ROOT_FOLDERS = {"encoders", "compose", "panorama", "fill", "vary", "training", "toyworld", "bench", "comfyui", "cli"}
ROOT_FOLDERS |= {"datasets"}  # real training data: COCO / scene-file import, the real-data shards
CORE = {p.removesuffix(".py") for p in ROOT_MODULES - {"__init__.py"}} | {"encoders"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `path` imports at run time (module level or inside functions; TYPE_CHECKING blocks
    are not imports). `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if _type_checking_only(node):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moviepostproduction"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    found.discard(module_name(path))
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_source_file_is_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["moviepostproduction.compose.pipeline"]  # the walk sees the package
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_package_root_holds_only_the_shared_core():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert {e for e in entries if e.endswith(".py")} == ROOT_MODULES
    assert {e for e in entries if (PACKAGE / e).is_dir()} == ROOT_FOLDERS | {"assets"}


def test_the_core_imports_no_capability():
    graph = import_graph()
    for name, deps in graph.items():
        top = name.split(".")[1] if "." in name else ""
        if top in CORE:
            outside = {d for d in deps if d.split(".")[1] not in CORE}
            assert outside == set(), f"{name} imports {sorted(outside)}"


def test_capabilities_import_only_the_core_and_compose():
    """compose, panorama, fill and vary sit on the core; panorama and fill reuse compose's conditioning."""
    allowed = {"compose": set(), "panorama": {"compose"}, "fill": {"compose"}, "vary": set(), "datasets": set()}
    for name, deps in import_graph().items():
        parts = name.split(".")
        if len(parts) > 2 and parts[1] in allowed:
            others = {d.split(".")[1] for d in deps} - CORE - {parts[1]} - allowed[parts[1]]
            assert others == set(), f"{name} imports {sorted(others)}"
