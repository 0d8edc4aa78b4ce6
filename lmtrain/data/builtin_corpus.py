"""A corpus that ships with every Python: the pydoc topic pages and the standard library's docstrings.

It lets the default job and the tests train on real English-and-code text with no download.
Sources are read (parsed, never imported), and sorted, so the corpus is the same on every run
of the same Python version.
"""

from __future__ import annotations

import ast
import pathlib
import sysconfig


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [f"{name}\n\n{text.strip()}" for name, text in sorted(topics.items()) if text.strip()]


def _module_docstrings(path: pathlib.Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(f"{node.name}: {doc}")
    return "\n\n".join(parts)


def _stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip", "turtledemo"}
    files = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        files.append(path)
    return files


def builtin_documents(max_docs: int = 0) -> list[str]:
    """Documents of the built-in corpus, in a fixed order; `max_docs` > 0 keeps only the first ones."""
    docs = _pydoc_topics()
    for path in _stdlib_files():
        if max_docs and len(docs) >= max_docs:
            break
        text = _module_docstrings(path)
        if len(text) > 200:
            docs.append(text)
    return docs[:max_docs] if max_docs else docs
