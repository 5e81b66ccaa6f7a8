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
    monkeypatch.setitem(GRAPH, "edgeslim.jobs_quantize", GRAPH["edgeslim.jobs_quantize"] + [("edgeslim.cli", None)])
    monkeypatch.setitem(GRAPH, "edgeslim.cli", GRAPH["edgeslim.cli"] + [("edgeslim.jobs_quantize", None)])
    assert any({"edgeslim.cli", "edgeslim.jobs_quantize"} <= set(c) for c in _cycles())


@pytest.mark.parametrize("job", sorted(m for m in MODULES if m.split(".")[-1].startswith("jobs")))
def test_no_job_imports_another_job(job):
    others = sorted({t for t, _ in GRAPH[job] if t != job and t.split(".")[-1].startswith("jobs")})
    assert not others, f"{job} imports {others}: shared parts belong in tasks / eval / config"
