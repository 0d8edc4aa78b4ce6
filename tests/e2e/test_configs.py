"""Every shipped config loads and validates; each start-up error says what is wrong."""

import json as json_lib
import pathlib

import jax
import pytest

from lmtrain.config import CONFIGS_DIR, ConfigError, apply_overrides, load_config, validate
from lmtrain.model import build_model_def, model_config_for
from lmtrain.train.trainer import train as train_run
from tests import core_fixtures
from tests.helpers import small_config
from tools import shard_data

CONFIG_NAMES = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
EXPECTED_PARAMS_M = {"gpt2_small": (124, 125), "gpt2_medium": (354, 356), "llama_1b": (1200, 1300),
                     "llama2_7b": (6700, 6800)}


def test_all_five_configs_ship():
    assert {"tiny", "gpt2_small", "gpt2_medium", "llama_1b", "llama2_7b"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_validates_and_builds_abstractly(name):
    cfg = load_config(name)
    validate(cfg, 8)  # as on an 8-device host
    model_def = build_model_def(model_config_for(cfg.model))  # shapes only, nothing allocated (T5 for model.arch='t5')
    millions = model_def.num_params() / 1e6
    lo, hi = EXPECTED_PARAMS_M.get(name, (0.1, 50))
    assert lo <= millions <= hi, f"{name}: {millions:.1f}M parameters"
    with pytest.raises(AttributeError):  # locked: a typo cannot add a field
        cfg.model.d_modle = 3
    runlocal = load_config(f"{name}:runlocal") if name != "tiny" else load_config("tiny:smoke")
    validate(runlocal, 1)


def test_unknown_override_is_an_error_naming_it():
    cfg = load_config("tiny")
    with pytest.raises(ConfigError, match=r"config\.optimizer\.lrr.*Did you mean: lr"):
        apply_overrides(cfg, {"optimizer.lrr": "1e-3"})
    with pytest.raises(ConfigError, match=r"config\.optimiser"):
        apply_overrides(cfg, {"optimiser.lr": "1e-3"})
    apply_overrides(cfg, {"optimizer.lr": "1e-3", "model.scan_layers": "true", "train.steps": "7"})
    assert (cfg.optimizer.lr, cfg.model.scan_layers, cfg.train.steps) == (1e-3, True, 7)


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(ConfigError, match="Known configs: .*gpt2_small"):
        load_config("gpt3_huge")


def _cfg(**kw):
    return small_config("llama", **kw)


@pytest.mark.parametrize("overrides, devices, message", [
    ({"data.batch_size": 12}, 8, r"data\.batch_size=12 is not divisible by the data-parallel size .* = 8"),
    ({"mesh.data": 1, "mesh.tensor": 8, "model.n_heads": 4}, 8, r"model\.n_heads=4 is not divisible by .*mesh\.tensor=8"),
    ({"model.n_kv_heads": 3}, 1, r"n_heads % n_kv_heads != 0"),
    ({"optimizer.name": "adam_w"}, 1, r"optimizer\.name='adam_w' is unknown.*adamw"),
    ({"optimizer.schedule": "cosine_restart"}, 1, r"optimizer\.schedule='cosine_restart' is unknown.*wsd"),
    ({"data.seq_len": 64}, 1, r"data\.seq_len=64 is larger than .*model\.max_seq_len=32"),
    ({"mesh.data": 4, "mesh.fsdp": 4}, 8, r"needs 16 devices, but only 8 are present"),
    ({"train.grad_accum": 3}, 1, r"train\.grad_accum=3"),
])
def test_validation_errors(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(**overrides), devices)


def test_cli_reports_config_errors(tmp_path):
    from lmtrain.train.trainer import main

    assert main(["--config=tiny", f"--workdir={tmp_path}", "--config.optimizer.name=adamm"]) == 2
    assert not (pathlib.Path(tmp_path) / "checkpoints").exists()


def test_device_count_matches_conftest():
    assert jax.device_count() == 8


def _local_spec(name: str) -> str:
    return "tiny:smoke" if name == "tiny" else f"{name}:runlocal"


LM_CONFIGS = [n for n in CONFIG_NAMES if load_config(n).task.name == "lm"]


def test_every_language_model_config_is_trained_below():
    assert {"tiny", "gpt2_small", "gpt2_medium", "llama_1b", "llama2_7b"} <= set(LM_CONFIGS)


@pytest.mark.slow
@pytest.mark.usefixtures("compile_cache")
@pytest.mark.parametrize("name", LM_CONFIGS)
def test_local_form_trains_on_packed_text_and_the_loss_falls(name, tmp_path, tokenizer_4096):
    """Each config's CPU-sized form, with its own model family (GPT-2's learned positions were NaN at step 1 on
    packed text), optimizer and mesh, trains on packed builtin text: finite, and the loss falls in 8 steps."""
    import json

    from lmtrain.train.trainer import train

    cfg = load_config(_local_spec(name))
    apply_overrides(cfg, {
        "data.source": "builtin", "data.max_docs": str(core_fixtures.CONFIG_RUN_DOCS), "data.tokenizer_dir": tokenizer_4096,
        "data.val_fraction": "0.1", "data.shards_dir": "", "train.steps": "8", "optimizer.warmup_steps": "2",
        "train.log_every": "1",
        "train.eval_every": "8", "train.eval_batches": "1", "checkpoint.every": "8", "train.sample_tokens": "0",
        "logging.tensorboard": "false", "logging.loss_curve_png": "false", "logging.progress_bar": "false"})
    assert cfg.model.max_seq_len >= cfg.data.seq_len and cfg.model.d_model <= 256, "not a CPU-sized form"
    result = train(cfg, tmp_path / name)  # a non-finite loss or update raises TrainingDiverged
    assert result.step == 8
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8
    # At init the loss is ~ln(4096) = 8.3 on every batch; 8 steps at the configs' own lr take off 0.25-0.45.
    assert sum(losses[-2:]) / 2 < losses[0] - 0.15, f"{name}: the loss did not fall: {losses}"
    assert result.metrics["val_loss"] < losses[0]


@pytest.mark.slow
@pytest.mark.usefixtures("compile_cache")
def test_t5_tiny_local_form_trains_on_the_packed_sft_demo(tmp_path, tokenizer_4096):
    """configs/t5_tiny.py's CPU form, an encoder-decoder on the seq2seq task, trains on the built-in SFT demo's
    real text packed whole (tools/shard_data.py --builtin-task sft): finite, and the loss falls in 8 steps."""
    shards = tmp_path / "sft_shards"
    assert shard_data.main(["--builtin-task", "sft", "--tokenizer", tokenizer_4096, "--seq-len", "128",
                            "--output", str(shards), "--quiet"]) == 0
    cfg = load_config("t5_tiny:runlocal")
    apply_overrides(cfg, {
        "data.tokenizer_dir": tokenizer_4096, "data.shards_dir": str(shards), "train.steps": "8",
        "optimizer.warmup_steps": "2", "train.log_every": "1", "train.eval_every": "8", "train.eval_batches": "1",
        "checkpoint.every": "8", "logging.tensorboard": "false", "logging.loss_curve_png": "false",
        "logging.progress_bar": "false"})
    result = train_run(cfg, tmp_path / "t5_tiny")
    assert result.step == 8
    records = [json_lib.loads(line) for line in (tmp_path / "t5_tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] - 0.15, f"t5_tiny: the loss did not fall: {losses}"
    assert result.metrics["val_loss"] < losses[0]
