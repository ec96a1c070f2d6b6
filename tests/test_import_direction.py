"""Imports point down: the workflow's task modules use the library, never each other; the explorer and the CLI
use the library, never the workflow's tasks (static analysis of the sources, function-level imports included)."""
from __future__ import annotations

from pathlib import Path

from diffaudit.dvcgen import module_imports

PKG = Path(__file__).resolve().parents[1] / "src" / "diffaudit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The package modules that module ``name`` imports (anywhere in its source): the project's one walker."""
    return module_imports(name)


def _reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in _imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_task_modules_import_only_library_modules():
    tasks = [m for m in MODULES if m.startswith("diffaudit.pipeline.") and m != "diffaudit.pipeline.common"]
    assert tasks
    bad = {t: sorted(d for d in _imports(t) if d.startswith("diffaudit.pipeline") and d != "diffaudit.pipeline.common")
           for t in tasks}
    assert not {t: d for t, d in bad.items() if d}
    # the shared helpers of the tasks are themselves only library
    assert not [d for d in _imports("diffaudit.pipeline.common") if d.startswith("diffaudit.pipeline")]


def test_explorer_and_cli_do_not_reach_the_workflow_tasks():
    for top in ("diffaudit.cli", "diffaudit.explorer", "diffaudit.explorer.data", "diffaudit.explorer.server"):
        assert not sorted(m for m in _reachable(top) if m.startswith("diffaudit.pipeline")), top


def test_the_walker_sees_function_level_imports():
    assert "diffaudit.model_extraction" in _imports("diffaudit.pipeline.extract")
    assert "diffaudit.paper_files" in _imports("diffaudit.explorer.data")
