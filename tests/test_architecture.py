"""The package's shape (issue 17): modules of a readable size, imports that point down (no cycle), and no generic
code that tests which model family it has (families are asked, :mod:`diffaudit.families`)."""
from __future__ import annotations

import ast
from pathlib import Path

from diffaudit.dvcgen import module_imports
from diffaudit.families import registry

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffaudit"
MAX_LINES = 600
#: Modules allowed over MAX_LINES, with the reason (none: keep it that way).
OVERSIZE: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_no_module_is_over_600_lines():
    too_long = {}
    for name, path in _modules().items():
        rel = path.relative_to(PACKAGE).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in OVERSIZE:
            too_long[rel] = n
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: module_imports(name) for name in modules}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _family_strings(node) -> set[str]:
    names = set(registry.names())
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)} & names
    return set()


def test_no_family_name_comparisons_outside_families():
    """Generic code asks the family object (registry.family_of / of_store) instead of testing its name."""
    offences = []
    for name, path in _modules().items():
        if name == "diffaudit.families" or name.startswith("diffaudit.families."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                found = set().union(*(_family_strings(n) for n in [node.left, *node.comparators]))
                if found:
                    offences.append(f"{path.relative_to(SRC)}:{node.lineno} compares with {sorted(found)}")
    assert not offences, "\n".join(offences)


def test_the_registry_knows_each_family_once():
    names = registry.names()
    assert len(set(names)) == len(names) and set(names) >= {"sd", "sdxl", "sd3", "flux"}
    assert all(registry.get(n).name == n for n in names)
    embedded = registry.embedded_models()
    assert embedded == {"mini": "sd", "mini-cal": "sd", "mini-sdxl": "sdxl", "mini-sd3": "sd3", "mini-flux": "flux",
                        "mini-pixart": "pixart"}
    assert registry.of_store({"family": "flux"}) is registry.get("flux")
    assert registry.of_store({}) is registry.DEFAULT
