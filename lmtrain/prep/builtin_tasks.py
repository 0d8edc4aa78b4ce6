"""Three fine-tuning demos made from the standard library's source, which ships with Python (no download).

- sft: a public function's signature in, the summary line of its docstring out, e.g. prompt
  "shutil.copyfile(src, dst, *, follow_symlinks=True)\\n" -> completion "Copy data from src to dst in the most
  efficient way possible."
- classify: which area of the standard library a docstring comes from, 6 balanced classes
  (concurrency, devtools, files, formats, math, network); the majority-class baseline is about 1/6.
- pref: preference pairs for dpo, orpo and reward: sft's prompt, its own summary as `chosen` and the summary of a
  function half the list away as `rejected`; a model that knows nothing prefers either half the time.

Sources are parsed (never imported) in sorted order, so the records are the same on every run of the
same Python version. `tools/shard_data.py --builtin-task sft|classify|pref` shards them with
train/validation/test splits.
"""

from __future__ import annotations

import ast
import pathlib
import sysconfig
from collections.abc import Iterator

import xxhash

from lmtrain.data.builtin_corpus import _stdlib_files

TASKS = ("sft", "classify", "pref")

# Top-level stdlib modules (or packages) of each class of the classification demo.
AREAS = {
    "concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "queue", "subprocess", "sched",
                    "selectors"),
    "devtools": ("unittest", "doctest", "pdb", "bdb", "trace", "cProfile", "profile", "pstats", "pydoc", "inspect",
                 "ast", "dis", "tokenize", "traceback", "timeit", "tracemalloc", "warnings"),
    "files": ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "fileinput",
              "genericpath", "posixpath", "ntpath", "io", "_pyio"),
    "formats": ("json", "csv", "xml", "configparser", "plistlib", "tomllib", "pickle", "pickletools", "copyreg",
                "shelve", "dbm", "sqlite3", "base64", "binascii", "quopri"),
    "math": ("decimal", "_pydecimal", "fractions", "statistics", "random", "numbers", "cmath", "colorsys"),
    "network": ("http", "urllib", "email", "smtplib", "ftplib", "imaplib", "poplib", "mailbox", "xmlrpc",
                "socketserver", "ssl", "ipaddress", "wsgiref", "mimetypes", "socket"),
}
MIN_DOC_CHARS = 40
MAX_PREF_PROMPT_CHARS = 60  # a pair holds the prompt twice: short ones fit a small --seq-len with both summaries
MAX_CLASSIFY_CHARS = 600  # the docstring's start: enough to tell the area, short enough for CPU training


def _parsed_stdlib() -> Iterator[tuple[str, ast.Module]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield module, tree


def _public_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of module-level functions and the methods of module-level classes, public only."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item


def sft_records() -> Iterator[tuple[dict, str]]:
    """(record with prompt/completion, where) for every public function or method with a one-line summary."""
    seen: set[str] = set()
    for module, tree in _parsed_stdlib():
        for name, node in _public_functions(tree):
            doc = ast.get_docstring(node)
            summary = doc.strip().split("\n")[0].strip() if doc else ""
            if not 10 <= len(summary) <= 100:
                continue
            prompt = f"{module}.{name}({ast.unparse(node.args)})\n"
            if prompt in seen:
                continue
            seen.add(prompt)
            yield {"prompt": prompt, "completion": summary}, f"builtin sft task: {module}.{name} (line {node.lineno})"


def classify_records() -> Iterator[tuple[dict, str]]:
    """(record with text/label, where): docstrings of the AREAS' modules, the same number per class."""
    area_of = {m: a for a, modules in AREAS.items() for m in modules}
    by_area: dict[str, dict[str, str]] = {a: {} for a in AREAS}
    labels_of_text: dict[str, set[str]] = {}
    for module, tree in _parsed_stdlib():
        area = area_of.get(module.split(".")[0])
        if area is None:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < MIN_DOC_CHARS:
                continue
            text = doc.strip()[:MAX_CLASSIFY_CHARS]
            by_area[area].setdefault(text, f"builtin classify task: {module}.{node.name} (line {node.lineno})")
            labels_of_text.setdefault(text, set()).add(area)
    # a docstring found in two areas has no single answer; then keep the same count of each class,
    # choosing by a hash of the text so the choice is stable and unrelated to file order
    per_class = min(sum(len(labels_of_text[t]) == 1 for t in texts) for texts in by_area.values())
    for area in sorted(AREAS):
        texts = [t for t in by_area[area] if len(labels_of_text[t]) == 1]
        for text in sorted(texts, key=lambda t: xxhash.xxh64_intdigest(t.encode("utf-8"), seed=7))[:per_class]:
            yield {"text": text, "label": area}, by_area[area][text]


def pref_records() -> Iterator[tuple[dict, str]]:
    """(record with prompt/chosen/rejected, where): each sft record, preferring its own summary to the summary of
    the record half the list away (a fixed pairing, so the pairs are the same on every run)."""
    records = [(r, where) for r, where in sft_records() if len(r["prompt"]) <= MAX_PREF_PROMPT_CHARS]
    half = len(records) // 2
    for k, (record, where) in enumerate(records):
        other = records[(k + half) % len(records)][0]["completion"]
        if other != record["completion"]:
            yield {"prompt": record["prompt"], "chosen": record["completion"], "rejected": other}, where.replace(
                "builtin sft task", "builtin pref task")


def task_records(task: str) -> Iterator[tuple[dict, str]]:
    if task == "sft":
        return sft_records()
    if task == "pref":
        return pref_records()
    if task == "classify":
        return classify_records()
    raise ValueError(f"unknown built-in task '{task}'; choose one of {', '.join(TASKS)}.")
