"""Importing lmtrain changes no process-wide state (issue 18, "no import-time side effects").

Library modules leave excepthooks, log handlers and filters, warning filters, signal handlers and the environment
as they found them; the commands that need such hooks install them when they run (cli.main,
lmtrain.train.disk_full). Checked in a fresh interpreter: the third-party packages lmtrain imports at module level
are imported first, so that their own import-time changes are the baseline, then every lmtrain module in turn.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

PROBE = r'''
import ast, importlib, json, logging, os, pathlib, signal, sys, threading, warnings

files = sorted(pathlib.Path("lmtrain").rglob("*.py"))
modules = [".".join(f.parent.parts if f.name == "__init__.py" else f.with_suffix("").parts) for f in files]


def third_party_imports(tree):
    """What a file imports when it is imported (its top-level statements, not its functions' bodies)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


for name in sorted({n for f in files for n in third_party_imports(ast.parse(f.read_text()))}):
    if name.split(".")[0] not in ("lmtrain", "__future__"):
        try:
            importlib.import_module(name)
        except Exception:  # a name imported from a module rather than a submodule
            pass


def _named(objects):
    return [f"{type(o).__name__}#{id(o)}" for o in objects]


def loggers():
    named = {"": logging.getLogger()}
    named.update({n: l for n, l in logging.Logger.manager.loggerDict.items() if isinstance(l, logging.Logger)})
    return {n: (l.level, l.propagate, l.disabled, _named(l.handlers), _named(l.filters))
            for n, l in named.items()}


def state():
    return {
        "sys.excepthook": id(sys.excepthook), "threading.excepthook": id(threading.excepthook),
        "sys.unraisablehook": id(sys.unraisablehook), "warnings.filters": repr(warnings.filters),
        "os.environ": dict(os.environ), "signals": {s.name: repr(signal.getsignal(s)) for s in
                                                    (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)},
        "logger class": repr(logging.getLoggerClass()), "loggers": loggers(),
    }


def changes(before, after):
    out = []
    for key in before:
        if key == "loggers":
            for name, now in after[key].items():
                was = before[key].get(name, (logging.NOTSET, True, False, [], []))
                if now != was:
                    out.append(f"logger {name or 'root'!r}: (level, propagate, disabled, handlers, filters) "
                               f"{was} -> {now}")
        elif before[key] != after[key]:
            if key == "os.environ":
                keys = sorted(k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k))
                out.append(f"os.environ: {keys}")
            else:
                out.append(f"{key}: {before[key]} -> {after[key]}")
    return out


found = {}
for module in modules:
    before = state()
    importlib.import_module(module)
    found.update({module: c for c in [changes(before, state())] if c})
print(json.dumps({"modules": modules, "changes": found}))
'''


def test_importing_every_lmtrain_module_changes_no_process_state():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "lmtrain.train.checkpoint" in report["modules"] and "lmtrain.cli" in report["modules"]
    assert report["changes"] == {}, "\n".join(f"{m}: {c}" for m, cs in report["changes"].items() for c in cs)

