"""The package's shape, checked from its source: no import cycles, no private name imported across modules, no job
importing another job (docs/design.md, "Where a change goes")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgeslim"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


MODULES = _modules()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (annotations only: not an import at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every run-time import of an edgeslim module in ``name``."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            if not base.startswith("edgeslim"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if sub in MODULES else (base, a.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("edgeslim")]
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} imports {target}.{n}" for m, deps in GRAPH.items() for target, n in deps
               if n and n.startswith("_") and not n.startswith("__") and target != m]
    assert not private, "\n".join(private)


def _cycles() -> list[list[str]]:
    edges = {m: {t for t, _ in deps if t in MODULES and t != m} for m, deps in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The check above can fail: a planted a -> b -> a cycle is reported."""
    monkeypatch.setitem(GRAPH, "edgeslim.jobs.quantize", GRAPH["edgeslim.jobs.quantize"] + [("edgeslim.cli", None)])
    monkeypatch.setitem(GRAPH, "edgeslim.cli", GRAPH["edgeslim.cli"] + [("edgeslim.jobs.quantize", None)])
    assert any({"edgeslim.cli", "edgeslim.jobs.quantize"} <= set(c) for c in _cycles())


JOBS = sorted(m for m in MODULES if m.startswith("edgeslim.jobs."))
HELPERS = {"edgeslim.jobs.plan_roads"}  # a job's own parts, not a job


def test_the_jobs_are_found():
    assert {"edgeslim.jobs.quantize", "edgeslim.jobs.mixed", "edgeslim.jobs.qat"} <= set(JOBS)


@pytest.mark.parametrize("job", [j for j in JOBS if j not in HELPERS])
def test_no_job_imports_another_job(job):
    others = sorted({t for t, _ in GRAPH[job] if t != job and t in JOBS and t not in HELPERS})
    assert not others, f"{job} imports {others}: shared parts belong in tasks / eval / config"


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (also inside top-level ``if`` / ``try``): defs, classes, assignments,
    imports."""
    names: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return names


def _all_problems(name: str, path: Path) -> list[str]:
    """What is wrong with module ``name``'s ``__all__``: missing, not a literal list of strings, or naming something
    the module (or, for a package, its submodules) does not define."""
    tree = ast.parse(path.read_text())
    declared = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            try:
                declared = ast.literal_eval(node.value)
            except ValueError:
                return [f"{name}: __all__ is not a literal list of names"]
    if declared is None:
        return [f"{name} has no __all__"]
    bound = _bound_names(tree)
    subs = {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()} \
        if path.name == "__init__.py" else set()
    return [f"{name}.__all__ names {n!r}, which it does not define" for n in declared if n not in bound | subs]


def test_every_module_has_an_all_naming_what_it_defines():
    problems = [p for name, path in sorted(MODULES.items()) if path.name != "__main__.py"
                for p in _all_problems(name, path)]
    assert not problems, "\n".join(problems)


def test_the_all_check_finds_a_missing_all_and_a_missing_name(tmp_path):
    """The check above can fail: a module without ``__all__`` and one naming an undefined function are reported."""
    (tmp_path / "a.py").write_text("def f():\n    pass\n")
    (tmp_path / "b.py").write_text("from os import path\n\n__all__ = ['f', 'path']\n")
    assert _all_problems("a", tmp_path / "a.py") == ["a has no __all__"]
    assert _all_problems("b", tmp_path / "b.py") == ["b.__all__ names 'f', which it does not define"]


def test_every_task_is_registered_on_both_sides():
    """A task is one module in ``edgeslim.tasks`` (the protocol) and one in ``edgeslim.cli.tasks`` (options and console
    lines); both tables name the same tasks, each CLI module has the three entry points, and ``--task`` offers them."""
    from edgeslim.cli.main import build_parser
    from edgeslim.cli.tasks import CLI_TASKS
    from edgeslim.tasks import TASKS

    assert set(CLI_TASKS) == set(TASKS)
    for name, module in CLI_TASKS.items():
        assert all(callable(getattr(module, f, None)) for f in ("build", "print_quantize", "print_qat")), name
    quantize = ["quantize", "m", "--calib-data", "c", "--data", "d", "--out", "o"]
    qat = ["qat", "m", "--train-data", "t", "--data", "d", "--out", "o"]
    for argv in (quantize, qat):
        for name in TASKS:
            assert build_parser().parse_args([*argv, "--task", name]).task == name
