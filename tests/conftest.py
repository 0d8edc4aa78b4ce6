"""Test set-up: 8 fake CPU devices for the sharding tests, set before JAX is imported anywhere, and one
persistent JAX compilation cache for the whole session (subprocesses inherit it through the environment):
the suite trains the same tiny models many times, and on 2 CPU cores compiling is most of each run."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LMTRAIN_SINGLE_HOST", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lmtrain-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from tests.gcs_fake import _fake_gcs_server, fake_gcs  # noqa: E402, F401 - the fake_gcs fixture


@pytest.fixture(scope="session")
def builtin_shards(tmp_path_factory):
    """The README's default-job toolchain on a slice of the built-in corpus: (tokenizer_dir, shards_dir)."""
    from tools import shard_data, train_tokenizer

    root = tmp_path_factory.mktemp("toolchain")
    tok, shards = root / "tokenizer", root / "shards"
    assert train_tokenizer.main(["--builtin", "--max-docs", "150", "--vocab-size", "1024", "--output", str(tok)]) == 0
    assert shard_data.main(["--builtin", "--max-docs", "150", "--tokenizer", str(tok), "--output", str(shards),
                            "--val-fraction", "0.1", "--shard-mb", "0.1", "--workers", "1", "--quiet"]) == 0
    return str(tok), str(shards)
