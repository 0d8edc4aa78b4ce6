"""The package's layering, held by its imports.

The core (config, model, parallel, data, tasks, train and the small modules they share) never imports a tool
(interop, evaluate, generate, serve, sweep, launch, prep, the command dispatcher): tools depend on the core,
never the reverse. And every internal import sits at the top of its module, where the dependency graph can
be read; an import inside a function is allowed only for a heavy optional third-party package. Each failure
names the offending file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lmtrain"

# Modules (dotted, under lmtrain) that make up the tools; everything else in the package is the core.
TOOLS = ("lmtrain.cli", "lmtrain.interop", "lmtrain.evaluate", "lmtrain.generate", "lmtrain.serve",
         "lmtrain.sweep", "lmtrain.launch", "lmtrain.prep")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


def _internal_imports(tree: ast.AST, module: str):
    """(node, imported module) for each import of an lmtrain module, relative imports resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lmtrain":
                    yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.split(".")[0] == "lmtrain":
                for alias in node.names:  # `from lmtrain import evaluate` imports the submodule
                    yield node, f"{name}.{alias.name}" if name == "lmtrain" else name


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, _module_name(path), ast.parse(path.read_text(), str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def test_the_core_imports_no_tool():
    offences = [f"{_where(path, node)}: core module {module} imports tool {target}"
                for path, module, tree in _sources() if not _is_tool(module)
                for node, target in _internal_imports(tree, module) if _is_tool(target)]
    assert not offences, "the core must not import the tools:\n" + "\n".join(offences)


def test_no_internal_import_sits_inside_a_function():
    offences = []
    for path, module, tree in _sources():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = ast.Module(body=fn.body, type_ignores=[])
                offences += [f"{_where(path, node)}: {target} imported inside {fn.name}()"
                             for node, target in _internal_imports(inner, module)]
    assert not offences, "move these imports to the top of their modules:\n" + "\n".join(sorted(set(offences)))


def test_the_tool_list_names_modules_that_exist():
    modules = {module for _, module, _ in _sources()}
    missing = [t for t in TOOLS if not any(m == t or m.startswith(t + ".") for m in modules)]
    assert not missing, f"TOOLS names modules that do not exist: {missing}"
