"""LoRA and frozen parameters: adapters on the dense() seam, sharded like their weights, merged exactly,
trained with the base frozen (no gradient, no optimizer state, bit-identical), small exact checkpoints."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.config import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.model.adapters import merged_params
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.train.state import create_sharded_state
from lmtrain.train.trainer import Components, train
from tests.helpers import small_config
from tests.tasks.test_tasks import task_shards  # noqa: F401 - the built-in task shards, a fixture

ALL = ("q", "k", "v", "o", "up", "down")


def _lora_cfg(family="llama", targets=ALL, **kw):
    extra = ("gate",) if family == "llama" and targets == ALL else ()
    return small_config(family, **{"model.lora_rank": 4, "model.lora_alpha": 8.0, "model.lora_targets": targets + extra,
                                   **kw})


def _perturbed(params, scale=0.05):
    """Non-zero B factors, so that the adapters change the output."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + scale * jax.random.normal(jax.random.key(hash(jax.tree_util.keystr(p)) % 2**31), x.shape)
        if "lora_" in jax.tree_util.keystr(p) else x, params)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_start_at_zero_and_merge_exactly(family):
    cfg = ModelConfig.from_config(_lora_cfg(family).model)
    model_def = ModelDef(cfg)
    base_def = ModelDef(dataclasses.replace(cfg, lora_rank=0, lora_targets=()))
    params = model_def.init(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    without = {k: v for k, v in merged_params(params, cfg).items()}
    # B = 0 at init: the adapted model is the base model.
    np.testing.assert_array_equal(np.asarray(model_def.apply(params, tokens)), np.asarray(base_def.apply(without, tokens)))
    params = _perturbed(params)
    adapted = np.asarray(model_def.apply(params, tokens))
    merged = np.asarray(base_def.apply(merged_params(params, cfg), tokens))
    assert np.abs(adapted - np.asarray(base_def.apply(without, tokens))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(merged, adapted, atol=2e-5)


def test_target_names_of_each_family_and_bad_targets():
    assert ModelConfig.from_config(_lora_cfg(targets=("q_proj", "v_proj")).model).lora_targets == ("q", "v")
    gpt2 = ModelConfig.from_config(_lora_cfg("gpt2", targets=("c_attn", "c_fc")).model)
    assert gpt2.lora_targets == ("q", "k", "v", "up")
    from lmtrain.config import validate

    with pytest.raises(ConfigError, match="'qq' matches no projection"):
        validate(_lora_cfg(targets=("qq",)), 8)
    with pytest.raises(ConfigError, match="no gate projection"):
        validate(_lora_cfg("gpt2", targets=("gate",)), 8)


def test_lora_rules_freeze_the_base_and_train_adapters_and_a_task_head():
    parts = Components.from_config(_lora_cfg())
    trained = [p for p, t in parts.plan.trainable.items() if t]
    assert trained and all("/lora_" in p for p in trained)
    train_state_shapes = jax.eval_shape(lambda: parts.tx.init(parts.plan.split(parts.model_def.shapes)[0]))
    n_state = sum(math.prod(x.shape) for x in jax.tree.leaves(train_state_shapes))
    n_adapter = sum(math.prod(parts.model_def.shapes["blocks"][m][k][f].shape)
                    for m in ("attn", "mlp") for k in parts.model_def.shapes["blocks"][m] if k.startswith("lora_")
                    for f in ("a", "b"))
    assert n_state <= 2 * n_adapter + 10  # Adam's two moments of the adapters, and counters: nothing for the base


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", [pytest.param((8, 1, 1), marks=pytest.mark.heavy),
                                        pytest.param((1, 4, 2), marks=pytest.mark.heavy), (2, 2, 2)])
def test_lora_sharded_equals_unsharded_with_scan_and_remat(mesh_shape):
    cfg = _lora_cfg(**{"model.scan_layers": True, "model.remat": "full", "model.n_kv_heads": 4})
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 256, (8, 16), dtype=np.int32),
             "targets": rng.integers(0, 256, (8, 16), dtype=np.int32), "loss_mask": np.ones((8, 16), np.float32),
             "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()}

    def run(shape):
        mesh = make_mesh(shape, jax.devices()[: math.prod(shape)])
        rules = cfg.mesh.axis_rules
        parts = Components.from_config(cfg)
        with axis_rules(mesh, rules):
            state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, mesh, rules, parts.plan)
            bs = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0], None))
            step = jax.jit(parts.train_step, in_shardings=(shardings, bs), out_shardings=(shardings, None))
            losses = []
            for _ in range(3):
                state, m = step(state, jax.device_put(batch, bs))
                losses.append(float(m["loss"]))
        return losses, jax.device_get(state["params"]), shardings

    ref_losses, ref_params, _ = run((1, 1, 1))
    losses, params, shardings = run(mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    spec_b = shardings["params"]["blocks"]["attn"]["lora_wq"]["b"].spec
    spec_a = shardings["params"]["blocks"]["attn"]["lora_wq"]["a"].spec
    if mesh_shape[2] > 1:
        assert "tensor" in tuple(spec_b), spec_b  # B splits over heads like wq
    if mesh_shape[1] > 1:
        assert "fsdp" in tuple(spec_a), spec_a  # A splits over embed like wq


def _base(tmp_path_factory_dir):
    cfg = small_config("llama", **{"model.vocab_size": 512, "data.max_docs": 60, "train.steps": 2, "train.eval_every": 0,
                                   "checkpoint.every": 2})
    train(cfg, tmp_path_factory_dir)
    return tmp_path_factory_dir


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return _base(tmp_path_factory.mktemp("base") / "run")


def _adapter_kw(base_run, **kw):
    return {"model.vocab_size": 512, "data.max_docs": 60, "train.steps": 4, "train.log_every": 1,
            "train.eval_every": 2, "train.eval_batches": 1, "checkpoint.every": 2, "model.lora_rank": 4,
            "model.lora_targets": ("q", "v", "down"), "train.init_from": str(base_run),
            "data.tokenizer_dir": str(base_run / "tokenizer"), "optimizer.lr": 1e-2, "optimizer.weight_decay": 0.1,
            **kw}


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_lora_run_keeps_the_base_bit_identical_checkpoints_only_adapters_and_resumes_exactly(base_run, tmp_path):
    from lmtrain.train.checkpoint import stored_leaves
    from lmtrain.workdir import restore_params

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(small_config("llama", **_adapter_kw(base_run)), straight)
    train(small_config("llama", **_adapter_kw(base_run)), resumed, stop_at_step=2)
    train(small_config("llama", **_adapter_kw(base_run)), resumed)
    assert _losses(straight) == _losses(resumed) and len(_losses(straight)) == 4
    stored = stored_leaves(straight / "checkpoints" / "4" / "state", "params")
    assert stored and all(any(k.startswith("lora_") for k in key) for key in stored)  # adapters only
    _, tuned = restore_params(straight)
    _, base = restore_params(base_run)
    for name in ("wq", "wk", "wo"):  # frozen base, weight decay on: bit-identical
        np.testing.assert_array_equal(np.asarray(tuned["blocks"]["attn"][name]), np.asarray(base["blocks"]["attn"][name]))
    np.testing.assert_array_equal(np.asarray(tuned["embed"]), np.asarray(base["embed"]))
    assert np.abs(np.asarray(tuned["blocks"]["attn"]["lora_wq"]["b"])).max() > 0  # the adapters trained


def test_freezing_the_first_blocks_keeps_them_bit_identical(base_run, tmp_path):
    from lmtrain.workdir import restore_params

    workdir = tmp_path / "frozen"
    kw = _adapter_kw(base_run, **{"model.lora_rank": 0, "optimizer.freeze": "embeddings+blocks:1"})
    train(small_config("llama", **kw), workdir)
    _, tuned = restore_params(workdir)
    _, base = restore_params(base_run)
    wq_t, wq_b = np.asarray(tuned["blocks"]["attn"]["wq"]), np.asarray(base["blocks"]["attn"]["wq"])
    np.testing.assert_array_equal(wq_t[0], wq_b[0])  # block 0 frozen (stacked on the layers axis)
    assert np.abs(wq_t[1] - wq_b[1]).max() > 0  # block 1 trained
    np.testing.assert_array_equal(np.asarray(tuned["embed"]), np.asarray(base["embed"]))


def test_bad_rules_and_presets_are_clear_errors():
    with pytest.raises(ConfigError, match=r"param_rules\[2\]: regex 'nothing_like_this' matches no parameter"):
        Components.from_config(small_config("llama", **{"optimizer.param_rules": (
            (r"(^|/)(scale|bias|b[a-z_]*)$", "no_decay"), (r"^(embed|pos_embed|head/w)$", "no_decay"),
            ("nothing_like_this", "freeze"))}))
    from lmtrain.config import validate

    with pytest.raises(ConfigError, match="optimizer.freeze='blocks:9'.*2 blocks"):
        validate(small_config("llama", **{"optimizer.freeze": "blocks:9"}), 8)
    with pytest.raises(ConfigError, match="optimizer.freeze='bogus' is unknown"):
        validate(small_config("llama", **{"optimizer.freeze": "bogus"}), 8)


# ---------------------------------------------------------------------------------------------- LoRA for each task


@pytest.fixture(scope="module")
def task_base(tmp_path_factory):
    """A base model to start from (an init_params directory, as `lmtrain import` writes), vocabulary 1024."""
    from lmtrain.train.checkpoint import save_init_params

    root = tmp_path_factory.mktemp("task_base")
    cfg = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": 1024, "model.max_seq_len": 32}).model)
    save_init_params(str(root), ModelDef(cfg).init(jax.random.key(7)))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("task", [pytest.param("lm", marks=pytest.mark.heavy), "sft", "classify"])
def test_lora_trains_each_task_with_the_base_frozen(task, task_shards, task_base, tmp_path):  # noqa: F811
    """lm, sft and classify train through LoRA: the checkpoint holds the adapters (and, for classify, the new head,
    which trains fully), the base is the init_from weights bit for bit, and the language-model losses fall."""
    from lmtrain.train.checkpoint import stored_leaves
    from lmtrain.workdir import restore_params

    tok, sft, classify = task_shards
    data = {"lm": {"data.tokenizer_dir": tok, "data.max_docs": 60},
            "sft": {"data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": sft},
            "classify": {"data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": classify}}[task]
    workdir = tmp_path / task
    train(small_config("llama", **{
        "task.name": task, "model.vocab_size": 1024, "model.max_seq_len": 32, "data.seq_len": 32, "train.steps": 8,
        "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 8, "optimizer.lr": 3e-3,
        "optimizer.weight_decay": 0.1, "model.lora_rank": 4, "model.lora_targets": ("q", "v", "o", "up", "down"),
        "train.init_from": str(task_base), **data}), workdir)
    stored = {"/".join(map(str, k)) for k in stored_leaves(workdir / "checkpoints" / "8" / "state", "params")}
    adapters = {p for p in stored if "/lora_" in p}
    assert len(adapters) == 10 and stored - adapters == ({"head/score"} if task == "classify" else set())
    _, tuned = restore_params(workdir)
    base = _init(task_base, tuned)
    for path in ("embed", "blocks/attn/wq", "blocks/mlp/w_in", "final_norm/scale"):
        np.testing.assert_array_equal(np.asarray(_at(tuned, path)), np.asarray(_at(base, path)), err_msg=path)
    assert np.abs(np.asarray(tuned["blocks"]["mlp"]["lora_w_out"]["b"])).max() > 0
    losses = _losses(workdir)
    assert len(losses) == 8 and all(np.isfinite(losses))
    if task != "classify":  # a classifier on a random base is chance at first and stays near it for 8 steps
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _init(base_dir, like):
    """The init_params of `base_dir` for the parameters of `like` that it holds."""
    from lmtrain.train.checkpoint import load_init_params

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    return load_init_params(str(base_dir), target)[0]
