"""Fixtures shared by the trainer-core tests (checkpoints, errors, logs, optimizer, configs).

`compile_cache` points JAX's persistent compilation cache at one directory for the session: the
tests start many short runs of the same tiny model, and on a busy 2-core machine compiling dominates
(a 4-step run takes ~100 s cold and ~14 s warm). Subprocess runs get it through the environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from tests.helpers import small_config

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_DOCS = 40  # the fewest builtin documents that still leave a validation split


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory) -> str:
    return os.environ.get("LMTRAIN_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module", autouse=False)
def compile_cache(compile_cache_dir):
    """Enable the persistent compilation cache for one module, and restore the settings after it."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", compile_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield compile_cache_dir
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="session")
def tokenizer_512(tmp_path_factory) -> str:
    """A 512-token BPE trained on the builtin documents the runs use (trained once per session)."""
    from lmtrain.data.builtin_corpus import builtin_documents
    from lmtrain.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok512") / "tokenizer"
    train_bpe_tokenizer(builtin_documents(MAX_DOCS), 512, out)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_4096(tmp_path_factory) -> str:
    """The vocabulary size of the configs' `runlocal` forms, trained on the documents the config runs use."""
    from lmtrain.data.builtin_corpus import builtin_documents
    from lmtrain.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok4096") / "tokenizer"
    train_bpe_tokenizer(builtin_documents(CONFIG_RUN_DOCS), 4096, out)
    return str(out)


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
