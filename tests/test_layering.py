"""The packages read top-down: every import (module-level or inside a function) points to the same
package or one below it, and no two modules import each other, directly or in a circle.

    catalog    knobs, measured rows, fronts, SLOs, the policy (pure: no torch, no other package)
    placement  the engine, plans, models, the decoder, selection scores, the session
    profiler   perplexity, profiling, the search, the cost model   } siblings: neither imports
    runtime    controller, executor, the Ray actor                 } the other
    qos        the command line and its demo
    experiments: scripts; no package imports them
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANK = {"catalog": 0, "placement": 1, "profiler": 2, "runtime": 2, "qos": 3}
PACKAGES = [*RANK, "experiments"]


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every project module `path` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from placement import kernels`
    return {m for m in found if m.split(".")[0] in PACKAGES}


GRAPH = {name: {m for m in imports(path) if m in modules()} for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.split(".")[0] in RANK))
def test_imports_point_down_or_sideways_within_the_package(module):
    top = module.split(".")[0]
    for target in GRAPH[module]:
        other = target.split(".")[0]
        assert other != "experiments", f"{module} imports the scripts in {target}"
        assert RANK[other] < RANK[top] or other == top, f"{module} imports {target}, which is above or beside it"


def test_catalog_imports_no_torch():
    for name, path in modules().items():
        if name.startswith("catalog"):
            assert not {m for m in _all_imports(path) if m.split(".")[0] in ("torch", "ray", "transformers")}, name


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_no_module_imports_itself_in_a_circle():
    seen, done, cycles = [], set(), []

    def visit(m):
        if m in seen:
            cycles.append(seen[seen.index(m):] + [m])
            return
        if m in done:
            return
        seen.append(m)
        for target in sorted(GRAPH.get(m, ())):
            if target != m and not m.startswith(target + "."):  # a package's own __init__ is no edge
                visit(target)
        seen.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)
    assert not cycles, f"import circles: {cycles[:3]}"
