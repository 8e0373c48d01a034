"""The layout's rules, derived from every import in the code (those inside functions included).

The wings `wisp_server` and `wisp_edge` never import each other: what both need lives in `wisp_common`, which
imports neither, and the tools that use both, the trainer `wisp_distill` and the load generator `wisp_bench`, stand
apart (no wing imports them). No module takes part in an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wisp_common", "wisp_server", "wisp_edge", "wisp_distill", "wisp_bench")
GENERATED = "wisp_common.proto"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    files = (f for package in PACKAGES for f in (ROOT / package).rglob("*.py"))
    return {module_name(f): f for f in files if not module_name(f).startswith(GENERATED)}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it, resolved to modules (``from a import b`` where
    ``a.b`` is a module counts as importing ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            names = [n for n in names[:-1] if n in modules] or [node.module]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES and not n.startswith(GENERATED))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def test_the_wings_never_import_each_other_and_the_common_part_imports_neither():
    tools = {"wisp_distill", "wisp_bench"}
    forbidden = {
        "wisp_server": {"wisp_edge", *tools},
        "wisp_edge": {"wisp_server", *tools},
        "wisp_common": {"wisp_server", "wisp_edge", *tools},
        "wisp_distill": {"wisp_bench"},
    }
    crossings = [
        f"{module} imports {imported}"
        for module, imported_modules in import_graph().items()
        for imported in imported_modules
        if imported.split(".")[0] in forbidden.get(module.split(".")[0], set())
    ]
    assert not crossings, crossings


def test_no_module_takes_part_in_an_import_cycle():
    graph = import_graph()
    cycles = []
    state: dict[str, str] = {}  # visiting / done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "visiting"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "visiting":
                cycles.append(stack[stack.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]


def test_the_checks_see_imports_inside_functions_and_would_catch_a_crossing(tmp_path):
    """The rules above can fail: an import hidden in a function body is found and resolved to its module."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from wisp_edge.drafter import Drafter\n    import wisp_server.scheduler\n")
    assert imports_of(source, set(our_modules())) == {"wisp_edge.drafter", "wisp_server.scheduler"}
