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

from tests.core_fixtures import CONFIG_RUN_DOCS, MAX_DOCS  # noqa: E402
from tests.gcs_fake import _fake_gcs_server, fake_gcs  # noqa: E402, F401 - the fake_gcs fixture

# `compile_cache` points JAX's persistent compilation cache at one directory for the session: the tests start
# many short runs of the same tiny model, and on a busy 2-core machine compiling dominates (a 4-step run takes
# ~100 s cold and ~14 s warm). Subprocess runs get it through the environment.


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


# The `heavy` set beyond the tests marked in their files: each takes ~15 s or more on 2 CPU cores and a lighter
# test in the default run covers the same code path (listed beside it). `.ci/run` runs them with `-m heavy`.
HEAVY = (
    "test_sharding.py::test_sharded_equals_unsharded[",  # ~2 min each; test_lora.py (2,2,2) mesh stays
    "test_multiprocess.py::",  # the whole module: several jax.distributed processes; test_mesh.py stays
    "test_train.py::test_sigterm_leaves_a_resumable_checkpoint",  # stop/resume: the default-job CLI test
    "test_train.py::test_resume_ignores_a_checkpoint_whose_save_was_killed",
    "test_checkpoint.py::test_more_signals_during_the_final_save_keep_the_checkpoint",
    "test_checkpoint.py::test_best_by_a_max_metric_survives_a_restart_and_exports",
    "test_checkpoint.py::test_init_from_which_best_or_latest_starts_from_that_checkpoint",
    "test_train_logs.py::test_after_sigkill_and_resume_every_step_is_logged_once_and_the_plot_is_drawn",
    "test_lora.py::test_lora_run_keeps_the_base_bit_identical_checkpoints_only_adapters_and_resumes_exactly",
    "test_lora.py::test_adapters_start_at_zero_and_merge_exactly[llama]",  # [gpt2] stays
    "test_lora.py::test_lora_trains_each_task_with_the_base_frozen[",
    "test_lora_interop.py::test_a_peft_adapter_imports_with_equal_logits_loss_and_gradients",
    "test_lora_interop.py::test_lmtrain_export_of_a_lora_run_merged_adapter_and_base",
    "test_model.py::test_chunked_attention_equals_fused_attention[",  # the in-model chunked test stays
    "test_gcs.py::test_lmtrain_train_on_a_gcs_workdir_resumes_like_a_local_run",  # test_data_gcs.py stays
    "test_encoder.py::test_mlm_sharded_equals_unsharded",
    "test_encoder.py::test_encoder_classifier_trains_on_the_pooled_cls_token",
    "test_configs.py::test_local_form_trains_on_packed_text_and_the_loss_falls[gpt2_medium]",  # tiny, gpt2_small stay
    "test_configs.py::test_local_form_trains_on_packed_text_and_the_loss_falls[llama_1b]",
    "test_configs.py::test_local_form_trains_on_packed_text_and_the_loss_falls[llama2_7b]",
    "test_hf_export_sharded.py::test_sharded_restore_exports_bit_identically_to_one_device",
    "test_hf_import.py::test_the_printed_path_shards_with_the_model_tokenizer_and_trains_from_the_imported_weights",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("/")[-1]
        if node.startswith(HEAVY):
            item.add_marker(pytest.mark.heavy)
