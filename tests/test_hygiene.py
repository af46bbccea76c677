"""Library hygiene: no printing outside the CLI, one logger tree, no global state set at import."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tmequant"
# The command line prints by design; __main__ only starts it.
CLI_FILES = {PKG / "__main__.py"} | set((PKG / "cli").rglob("*.py"))


def _library_files() -> list[Path]:
    files = sorted(p for p in PKG.rglob("*.py") if p not in CLI_FILES)
    assert len(files) > 20  # the walk found the package
    return files


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_library_code_never_prints():
    found = []
    for path in _library_files():
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            name = _dotted(call.func)
            if name in ("print", "pprint", "pprint.pprint") or name.endswith(
                    ("sys.stdout.write", "sys.stderr.write")):
                found.append(f"{path.relative_to(PKG.parent)}:{call.lineno} {name}()")
    assert not found, "library code prints (log via logging.getLogger('tmequant')): " + "; ".join(found)


def _in_tree(arg: ast.AST | None) -> bool:
    return (isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            and (arg.value == "tmequant" or arg.value.startswith("tmequant."))) or (
        isinstance(arg, ast.Name) and arg.id == "__name__")


def test_loggers_are_in_the_tmequant_tree():
    """Module loggers are ``tmequant`` (or children); nothing logs to or configures the root.

    Inside a function, a third-party logger may be quietened for a moment (tifffile on
    corrupt files, distributed on shutdown); the module-level ``log`` is always ours.
    """
    bad = []
    for path in _library_files() + sorted(CLI_FILES):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            if _dotted(call.func) == "logging.getLogger" and (
                    not call.args or (isinstance(call.args[0], ast.Constant)
                                      and call.args[0].value in (None, "", "root"))):
                bad.append(f"{path.relative_to(PKG.parent)}:{call.lineno} root logger")
            if _dotted(call.func).startswith("logging.") and _dotted(call.func).split(".")[1] in (
                    "info", "warning", "error", "debug", "exception", "critical", "log"):
                bad.append(f"{path.relative_to(PKG.parent)}:{call.lineno} {_dotted(call.func)}()")
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) \
                    and _dotted(stmt.value.func) == "logging.getLogger" \
                    and not _in_tree(stmt.value.args[0] if stmt.value.args else None):
                bad.append(f"{path.relative_to(PKG.parent)}:{stmt.lineno} module logger")
    assert not bad, "logging outside the 'tmequant' logger tree: " + ", ".join(bad)


_GLOBAL_SETTERS = (
    "warnings.filterwarnings", "warnings.simplefilter", "logging.basicConfig",
    "torch.set_num_threads", "torch.set_num_interop_threads", "torch.set_default_dtype",
    "torch.set_grad_enabled", "np.seterr", "numpy.seterr", "np.set_printoptions",
    "matplotlib.use", "os.environ.setdefault", "torch.manual_seed", "np.random.seed",
    "random.seed",
)


def test_nothing_global_is_set_at_module_level():
    """Calls that change process-wide state may run inside functions (on request), never at import."""
    found = []
    for path in _library_files():
        tree = ast.parse(path.read_text(), str(path))
        for stmt in tree.body:  # module level only: not inside functions or classes
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for call in _calls(stmt):
                if _dotted(call.func) in _GLOBAL_SETTERS:
                    found.append(f"{path.relative_to(PKG.parent)}:{call.lineno} {_dotted(call.func)}")
            for node in ast.walk(stmt):  # os.environ[...] = ... at import
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Subscript) and _dotted(t.value) == "os.environ"
                        for t in node.targets):
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} os.environ[...] =")
    assert not found, "global state set at import: " + "; ".join(found)


def test_warning_filters_are_scoped():
    """Inside functions, warnings are silenced only within ``warnings.catch_warnings()``."""
    bad = []
    for path in _library_files():
        tree = ast.parse(path.read_text(), str(path))
        scoped: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    _dotted(getattr(item.context_expr, "func", item.context_expr)).endswith("catch_warnings")
                    for item in node.items):
                scoped |= {id(n) for n in ast.walk(node)}
        for call in _calls(tree):
            if _dotted(call.func) in ("warnings.filterwarnings", "warnings.simplefilter") \
                    and id(call) not in scoped:
                bad.append(f"{path.relative_to(PKG.parent)}:{call.lineno}")
    assert not bad, "unscoped warning filters: " + ", ".join(bad)
