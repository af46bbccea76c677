"""Size and structure figures of the package (issue 14): largest modules, longest functions,
function-level imports of the package's own modules, and import cycles between modules.

    python scripts/code_metrics.py [--root DIR] [--json out.json]

A function-level import is counted when it imports ``tmequant...`` inside a function body;
cycles are found on the graph of module-level imports (``if TYPE_CHECKING`` blocks and
function bodies excluded), per strongly connected component; "hidden" cycles are those that
close only through function-level imports (the usual reason for such an import).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(p: Path) -> str:
    rel = p.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(mod: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def analyse(root: Path = ROOT) -> dict:
    global ROOT
    ROOT = root
    files = sorted((root / "tmequant").rglob("*.py"))
    mods = {module_name(p): p for p in files}
    sizes, funcs, fl_imports = {}, [], []
    edges: dict[str, set[str]] = {m: set() for m in mods}
    all_edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        src = p.read_text()
        sizes[m] = src.count("\n")
        tree = ast.parse(src)

        def walk(node, in_func: bool, qual: str):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    funcs.append((ch.end_lineno - ch.lineno + 1, f"{m}:{qual}{ch.name}"))
                    walk(ch, True, f"{qual}{ch.name}.")
                elif isinstance(ch, ast.ClassDef):
                    walk(ch, in_func, f"{qual}{ch.name}.")
                elif isinstance(ch, ast.If) and _type_checking(ch):
                    continue
                elif isinstance(ch, (ast.Import, ast.ImportFrom)):
                    targets = [t for t in resolve(m, ch, p.name == "__init__.py") if t.startswith("tmequant")]
                    if in_func and targets:
                        fl_imports.append(f"{m}:{ch.lineno}")
                    for t in targets:
                        while t and t not in mods:
                            t = t.rpartition(".")[0]
                        if t and t != m:
                            all_edges[m].add(t)
                            if not in_func:
                                edges[m].add(t)
                else:
                    walk(ch, in_func, qual)

        walk(tree, False, "")
    # a package's __init__ importing its own submodules is not a cycle of concern; a
    # submodule importing its parent package is how names are re-exported: drop parent edges
    for g in (edges, all_edges):
        for m in g:
            g[m] = {t for t in g[m] if not m.startswith(t + ".")}
    cycles = [sorted(c) for c in _tarjan(edges) if len(c) > 1]
    hidden = [sorted(c) for c in _tarjan(all_edges) if len(c) > 1]
    funcs.sort(reverse=True)
    return {
        "modules": len(mods),
        "lines": sum(sizes.values()),
        "largest_modules": sorted(((v, k) for k, v in sizes.items()), reverse=True)[:5],
        "longest_functions": funcs[:8],
        "functions_over_100_lines": [f for f in funcs if f[0] > 100],
        "function_level_imports": len(fl_imports),
        "function_level_imports_by_module": _count(fl_imports),
        "import_cycles": cycles,
        "hidden_import_cycles": hidden,
    }


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        k = it.split(":")[0]
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _tarjan(g: dict[str, set[str]]) -> list[list[str]]:
    sys.setrecursionlimit(10000)
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
            out.append(comp)

    for v in g:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    r = analyse(a.root.resolve())
    print(f"{r['modules']} modules, {r['lines']} lines")
    print("largest modules:", ", ".join(f"{k} {v}" for v, k in r["largest_modules"]))
    print("longest functions:", ", ".join(f"{k} {v}" for v, k in r["longest_functions"]))
    print(f"functions over 100 lines: {len(r['functions_over_100_lines'])}")
    print(f"function-level imports of tmequant modules: {r['function_level_imports']}")
    for k, v in list(r["function_level_imports_by_module"].items())[:12]:
        print(f"  {k}: {v}")
    print(f"import cycles: {len(r['import_cycles'])}")
    for c in r["import_cycles"]:
        print("  " + " <-> ".join(c))
    print(f"hidden cycles (closed by function-level imports): {len(r['hidden_import_cycles'])}")
    for c in r["hidden_import_cycles"]:
        print("  " + " <-> ".join(c[:8]) + (f" ... ({len(c)} modules)" if len(c) > 8 else ""))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
