"""Helpers shared by the trainer-core tests (checkpoints, errors, logs, optimizer, configs): the run config,
the CLI runner and its environment, tmpfs mounts, tree digests. Their fixtures live in tests/conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import small_config

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_DOCS = 40  # the fewest builtin documents that still leave a validation split


CONFIG_RUN_DOCS = 80


def run_config(tokenizer_dir: str, steps: int = 4, family: str = "llama", **overrides):
    """A tiny model on packed builtin text: evaluates and checkpoints every 2 steps, logs every step."""
    return small_config(family, **{
        "model.vocab_size": 512, "data.max_docs": MAX_DOCS, "data.tokenizer_dir": tokenizer_dir,
        "optimizer.lr": 3e-3, "train.steps": steps, "train.log_every": 1, "train.eval_every": 2,
        "train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.keep": 1, **overrides})


def cli_env(cache_dir: str | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def cli(args: list[str], cache_dir: str | None = None, **kw) -> subprocess.Popen:
    """`python -m lmtrain.cli ARGS`, stdout and stderr merged."""
    return subprocess.Popen([sys.executable, "-m", "lmtrain.cli", *args], cwd=REPO, env=cli_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def config_overrides(cfg) -> list[str]:
    """`--config.K=V` flags that reproduce `cfg` on top of base_config() (for CLI runs of test configs)."""
    from lmtrain.config import base_config

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    base, mine = flat(base_config().to_dict()), flat(cfg.to_dict())
    return [f"--config.{k}={v}" for k, v in sorted(mine.items()) if base.get(k) != v]


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`: to show that nothing was written."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
    """A tmpfs mounted at `path` (root only): a real read-only or size-limited file system ("size=128k")."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); run as root to test this")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
