"""The package's shape at a git revision: function sizes and the import graph, from the source alone.

    python tools/layout.py                 # the working tree
    python tools/layout.py --rev bda22d9   # any commit (read with `git show`, nothing checked out)
    python tools/layout.py --cycles        # only the import cycles (exit 1 if there is one)

Sizes are lines from `def`/`class` to the end of the body, for every top-level function and class
(methods indented under their class). Imports are the package-internal ones, including those
inside functions (which hide a cycle rather than remove it). Nothing is imported or executed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sources(rev: str | None) -> dict[str, str]:
    """module name (minillm.x.y) -> source text, at `rev` or in the working tree."""
    if rev is None:
        files = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in (REPO / "minillm").rglob("*.py")}
    else:
        names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, "minillm"],
                               capture_output=True, text=True, check=True).stdout.split()
        files = {n: subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{n}"], capture_output=True,
                                   text=True, check=True).stdout for n in names if n.endswith(".py")}
    out = {}
    for path, text in files.items():
        mod = path[:-3].replace("/", ".")
        out[mod.removesuffix(".__init__")] = text
    return out


def internal_imports(mod: str, tree: ast.AST, is_package: bool) -> set[str]:
    deps = set()
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - node.level + 1] if node.level > 1 else base
                target = ".".join(parts + ([node.module] if node.module else []))
                if node.module is None:  # from . import a, b: submodules
                    deps.update(f"{target}.{a.name}" for a in node.names)
                else:
                    deps.add(target)
            elif node.module and node.module.startswith("minillm"):
                deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name.startswith("minillm"))
    return deps


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m in graph and not state.get(m):
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if not state.get(n):
            visit(n)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="a git revision (default: the working tree)")
    ap.add_argument("--cycles", action="store_true", help="print only import cycles")
    args = ap.parse_args()
    src = sources(args.rev)
    graph = {}
    for mod, text in sorted(src.items()):
        tree = ast.parse(text)
        is_pkg = any(k.startswith(mod + ".") for k in src)
        # The package's own lazy __init__ is not a dependency of the modules that live in it.
        graph[mod] = {d for d in internal_imports(mod, tree, is_pkg) if d in src and d != mod and d != "minillm"}
        if args.cycles:
            continue
        rows = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                rows.append(f"  {node.name} {node.end_lineno - node.lineno + 1}")
                if isinstance(node, ast.ClassDef):
                    rows += [f"    .{n.name} {n.end_lineno - n.lineno + 1}" for n in node.body
                             if isinstance(n, ast.FunctionDef)]
        print(f"{mod} ({len(text.splitlines())} lines) -> imports {', '.join(sorted(graph[mod])) or 'nothing in minillm'}")
        print("\n".join(rows))
    found = cycles(graph)
    print(f"import cycles: {len(found)}" + "".join(f"\n  {' -> '.join(c)}" for c in found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
