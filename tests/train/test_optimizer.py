"""The optimizer and the step around it (issue 7, items 5 and the optimizer/dropout tests): schedule values,
the parameter-rules table (weight decay, freezing, lr multipliers), clipping, optimizer state sharded like
its parameters, float32 master weights under bf16 storage, and dropout that differs between steps."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain.config import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.parallel.mesh import make_mesh
from lmtrain.param_rules import ParamPlan, named_param_rules, param_paths
from lmtrain.train.checkpoint import load_init_params, save_init_params
from lmtrain.train.optimizer import learning_rate_schedule, make_optimizer
from lmtrain.train.state import create_sharded_state, init_state_fn
from lmtrain.train.trainer import Components, main
from tests.helpers import small_config as _small_config

pytestmark = pytest.mark.usefixtures("compile_cache")


def small_config(family: str = "llama", **overrides):
    """tests.helpers.small_config with one block: what these tests look at needs no depth, compiling does."""
    return _small_config(family, **{"model.n_layers": 1, **overrides})


def _batch(seed: int = 0, vocab: int = 256, b: int = 8, length: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, vocab, (b, length), dtype=np.int32),
            "targets": rng.integers(0, vocab, (b, length), dtype=np.int32),
            "loss_mask": np.ones((b, length), np.float32), "segment_ids": np.ones((b, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def _params(state) -> dict:
    """All parameters of a train state, trainable and frozen (kept apart or not)."""
    return ParamPlan.merge(state["params"], state.get("frozen", {}))


def _state_and_step(cfg):
    parts = Components.from_config(cfg)
    state = jax.jit(init_state_fn(parts.model_def, parts.tx, cfg.train.seed, parts.plan))()
    return parts, state, jax.jit(parts.train_step)


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedule_warms_up_from_lr_over_warmup_and_ends_at_min_lr(schedule):
    cfg = small_config("llama", **{"optimizer.schedule": schedule, "optimizer.lr": 1e-3, "optimizer.warmup_steps": 10,
                                   "optimizer.min_lr_ratio": 0.1, "train.steps": 100})
    lr = learning_rate_schedule(cfg.optimizer, 100)
    # Step 0 (the first update) already moves: lr / warmup, not 0; the last warmup step takes the peak.
    np.testing.assert_allclose(float(lr(0)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose([float(lr(s)) for s in range(10)], [1e-4 * (s + 1) for s in range(10)], rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    after = [float(lr(s)) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:])), "no increase after warmup"
    end = 1e-3 if schedule == "constant" else 1e-4
    np.testing.assert_allclose(float(lr(100)), end, rtol=1e-5)


def test_schedule_without_warmup_starts_at_lr():
    cfg = small_config("llama", **{"optimizer.warmup_steps": 0, "optimizer.lr": 2e-3})
    lr = learning_rate_schedule(cfg.optimizer, 10)
    np.testing.assert_allclose(float(lr(0)), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 2e-3 * cfg.optimizer.min_lr_ratio, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the rules table

MATRICES = {"blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv", "blocks/attn/wo", "blocks/mlp/w_in",
            "blocks/mlp/w_out", "blocks/mlp/w_gate"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_rules_decay_only_the_block_matrices(family):
    """Norms, biases, embeddings and the vocabulary projection (GPT-2's tied embedding, Llama's untied head)
    get no weight decay."""
    parts = Components.from_config(small_config(family))
    paths = set(param_paths(parts.model_def.shapes))
    assert ("head/w" in paths) == (family == "llama") and ("pos_embed" in paths) == (family == "gpt2")
    decayed = {p for p in paths if parts.plan.decay[p]}
    assert decayed == MATRICES & paths, decayed


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "adafactor"])
def test_weight_decay_reaches_only_decayed_parameters(name):
    """With zero gradients, the only update is weight decay: it must move exactly the decayed parameters."""
    cfg = small_config("llama", **{"optimizer.name": name, "optimizer.weight_decay": 0.5, "optimizer.clip_norm": 0.0,
                                   "optimizer.warmup_steps": 0})
    parts = Components.from_config(cfg)
    params = parts.model_def.init(jax.random.key(0))
    updates, _ = parts.tx.update(jax.tree.map(jnp.zeros_like, params), parts.tx.init(params), params)
    for path, u in param_paths(updates).items():
        moved = bool(jnp.any(u != 0))
        assert moved == parts.plan.decay[path], f"{name}: {path} decayed={parts.plan.decay[path]} but moved={moved}"


@pytest.mark.slow
def test_frozen_parameter_is_bit_identical_and_has_no_optimizer_state():
    cfg = small_config("llama", **{"optimizer.param_rules": (*small_config("llama").optimizer.param_rules,
                                                             (r"^embed$", "freeze"), (r"attn_norm", "freeze")),
                                   "optimizer.weight_decay": 0.5, "optimizer.lr": 1e-2})
    parts, state, step = _state_and_step(cfg)
    before = jax.tree.map(np.asarray, _params(state))
    opt_paths = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
                 for kp, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
    assert not any("embed" in p or "attn_norm" in p for p in opt_paths), sorted(opt_paths)
    assert any("blocks/attn/wq" in p for p in opt_paths)
    for seed in range(3):
        state, metrics = step(state, _batch(seed))
        assert bool(metrics["update_finite"])
    after = jax.tree.map(np.asarray, _params(state))
    np.testing.assert_array_equal(after["embed"], before["embed"])
    np.testing.assert_array_equal(after["blocks"]["attn_norm"]["scale"], before["blocks"]["attn_norm"]["scale"])
    assert not np.array_equal(after["blocks"]["attn"]["wq"], before["blocks"]["attn"]["wq"])
    assert parts.plan.counts(parts.model_def.shapes)[1] == before["embed"].size + before["blocks"]["attn_norm"]["scale"].size


@pytest.mark.slow
def test_all_but_head_trains_only_the_head_of_a_language_model_and_of_a_classifier():
    """optimizer.freeze='all_but_head' (a linear probe): the head trains; embeddings, blocks and norms are frozen,
    kept out of the optimizer and bit-identical after steps."""

    cfg = small_config("llama", **{"optimizer.freeze": "all_but_head", "optimizer.lr": 1e-2,
                                   "optimizer.weight_decay": 0.5})
    parts, state, step = _state_and_step(cfg)
    assert parts.plan.trainable == {p: p.startswith("head/") for p in parts.plan.trainable} and parts.plan.trainable["head/w"]
    assert list(param_paths(state["params"])) == ["head/w"]
    before = param_paths(jax.tree.map(np.asarray, _params(state)))
    for seed in range(2):
        state, _ = step(state, _batch(seed))
    after = param_paths(jax.tree.map(np.asarray, _params(state)))
    for path, value in before.items():
        if path == "head/w":
            assert not np.array_equal(after[path], value)
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=path)

    # A classifier's head is head/score: the preset leaves it the only trainable parameter.
    classify_def = ModelDef(dataclasses.replace(parts.model_def.cfg, head="classify", num_labels=3))
    rules = named_param_rules(cfg, classify_def.cfg, SimpleNamespace(head="classify"))
    plan = ParamPlan.from_rules(classify_def.shapes, [rule for _, rule in rules])
    assert [p for p, t in plan.trainable.items() if t] == ["head/score"]
    assert len(plan.trainable) > 5  # embeddings, blocks and norms: all there, all frozen


@pytest.mark.slow
def test_freezing_middle_layers_keeps_exactly_them_bit_identical():
    """'freeze_layers=1-2' on a 4-block model: blocks 1 and 2 of every stacked block parameter do not move (weight
    decay and momentum on), blocks 0 and 3 train."""
    cfg = small_config("llama", **{"model.n_layers": 4, "model.scan_layers": True, "optimizer.name": "sgd",
                                   "optimizer.lr": 1e-2,
                                   "optimizer.weight_decay": 0.5,
                                   "optimizer.param_rules": (*small_config("llama").optimizer.param_rules,
                                                             (r"^blocks/", "freeze_layers=1-2"))})
    parts = Components.from_config(cfg)
    state = init_state_fn(parts.model_def, parts.tx, 0, parts.plan)()  # eager and scanned: cheaper than compiling it
    step = jax.jit(parts.train_step)
    assert set(parts.plan.frozen_layers.values()) == {(1, 2)}
    before = param_paths(jax.tree.map(np.asarray, _params(state)))
    for seed in range(2):
        state, metrics = step(state, _batch(seed))
        assert bool(metrics["update_finite"])
    after = param_paths(jax.tree.map(np.asarray, _params(state)))
    blocks = [p for p in before if p.startswith("blocks/")]
    assert len(blocks) >= 6
    for path in blocks:
        assert before[path].shape[0] == 4, path
        for layer in (1, 2):
            np.testing.assert_array_equal(after[path][layer], before[path][layer], err_msg=f"{path} block {layer}")
        for layer in (0, 3):
            assert not np.array_equal(after[path][layer], before[path][layer]), f"{path} block {layer} did not train"
    assert not np.array_equal(after["embed"], before["embed"])


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_lr_rule_multiplies_the_updates(name):
    base = small_config("llama", **{"optimizer.name": name, "optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0})
    rules = (*base.optimizer.param_rules, ("^blocks/mlp/", "lr=0.25"))
    parts = Components.from_config(base)
    params = parts.model_def.init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)

    def first_update(rules_):
        plan = ParamPlan.from_rules(parts.model_def.shapes, rules_)
        tx, _ = make_optimizer(base.optimizer, base.train.steps, plan, parts.model_def.shapes)
        return param_paths(tx.update(grads, tx.init(params), params)[0])

    plain, scaled = first_update(base.optimizer.param_rules), first_update(rules)
    for path in plain:
        want = plain[path] * (0.25 if path.startswith("blocks/mlp/") else 1.0)
        np.testing.assert_allclose(scaled[path], want, rtol=1e-6, atol=1e-12, err_msg=path)


def test_rule_that_matches_nothing_is_a_config_error(tmp_path, capsys):
    shapes = Components.from_config(small_config("llama")).model_def.shapes
    with pytest.raises(ConfigError, match=r"optimizer\.param_rules\[1\]: regex '\^lora_' matches no parameter"):
        ParamPlan.from_rules(shapes, ((r"scale$", "no_decay"), (r"^lora_", "freeze")))
    with pytest.raises(ConfigError, match=r"param_rules\[0\].*label 'frozen' is unknown"):
        ParamPlan.from_rules(shapes, ((r"embed", "frozen"),))
    with pytest.raises(ConfigError, match="freeze every parameter"):
        ParamPlan.from_rules(shapes, ((r".", "freeze"),))


    code = main(["--config=tiny", f"--workdir={tmp_path / 'w'}", "--config.data.source=builtin",
                 "--config.optimizer.param_rules=(('^lora_', 'freeze'),)"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'^lora_' matches no parameter" in err, err


def test_clip_norm_clips_the_global_gradient_norm():
    cfg = small_config("llama", **{"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.lr": 1.0,
                                   "optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
                                   "optimizer.weight_decay": 0.0, "optimizer.clip_norm": 1.0})
    parts = Components.from_config(cfg)
    params = parts.model_def.init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0, p.dtype), params)
    norm = float(optax.global_norm(grads))
    assert norm > 10
    updates, _ = parts.tx.update(grads, parts.tx.init(params), params)
    np.testing.assert_allclose(float(optax.global_norm(updates)), 1.0, rtol=1e-5)
    small = jax.tree.map(lambda g: g * 0.5 / norm, grads)  # below the threshold: untouched
    updates, _ = parts.tx.update(small, parts.tx.init(params), params)
    np.testing.assert_allclose(float(optax.global_norm(updates)), 0.5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- sharded state


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "adafactor"])
def test_optimizer_state_is_sharded_like_its_parameters_under_fsdp(name):
    from jax.sharding import PartitionSpec


    cfg = small_config("llama", **{"optimizer.name": name, "mesh.data": 1, "mesh.fsdp": 8,
                                   "model.d_model": 64, "model.d_ff": 128})
    mesh = make_mesh((1, 8, 1))
    parts = Components.from_config(cfg)
    state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, mesh, cfg.mesh.axis_rules, parts.plan)
    params = param_paths(_params(state))
    assert params["blocks/attn/wq"].sharding.spec != PartitionSpec(), "FSDP must shard the matrices"
    mirrored = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        keys = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)
        owner = next((p for p in sorted(params, key=len, reverse=True) if keys.endswith(p)), None)
        if owner is None:
            assert leaf.size <= 1 or leaf.sharding.is_fully_replicated, keys  # counters
            continue
        p = params[owner]
        spec = tuple(p.sharding.spec) + (None,) * (p.ndim - len(p.sharding.spec))
        got = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        if leaf.shape == p.shape:
            assert got == spec, f"{name}: {keys} {got} != its parameter's {spec}"
            mirrored += 1
        else:  # Adafactor's factored statistics: the parameter's spec without the reduced dimension
            assert got in (spec[:-1], spec[:-2] + spec[-1:]) or leaf.size <= 1, f"{name}: {keys} {got} vs {spec}"
        # Each device holds only its shard: nothing mirrored is whole on every device.
        if leaf.size >= 8 * 64 and any(s is not None for s in got):
            assert leaf.addressable_shards[0].data.size < leaf.size, keys
    assert mirrored or name == "adafactor", f"{name}: no optimizer leaf mirrors a parameter"


# ---------------------------------------------------------------------------------------------- fp32 masters


@pytest.mark.slow
def test_bf16_storage_trains_float32_masters_and_small_updates_land():
    """model.param_dtype=bfloat16 (what `lmtrain import --param-dtype bfloat16` writes): training keeps float32
    parameters and optimizer state; one AdamW step at lr 1e-5 changes nearly every entry (the issue saw 15%)."""
    cfg = small_config("llama", **{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16",
                                   "optimizer.lr": 1e-5, "optimizer.warmup_steps": 0, "train.grad_accum": 2})
    _, state, step = _state_and_step(cfg)
    floats = [x for x in jax.tree.leaves((_params(state), state["opt_state"])) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats), {str(x.dtype) for x in floats}
    before = param_paths(jax.tree.map(np.asarray, _params(state)))
    state, metrics = step(state, _batch())
    after = param_paths(jax.tree.map(np.asarray, _params(state)))
    assert all(x.dtype == np.float32 for x in after.values())
    for path in before:
        if path == "embed":  # rows of tokens absent from the batch have no gradient (and no decay)
            continue
        changed = float(np.mean(after[path] != before[path]))
        assert changed > 0.99, f"{path}: only {changed:.1%} of the entries changed"


def test_bf16_init_params_are_read_into_float32(tmp_path):
    """An `lmtrain import --param-dtype bfloat16` output, read by train.init_from into the float32 state."""

    cfg = small_config("llama", **{"model.param_dtype": "bfloat16"})
    bf16_def = ModelDef(ModelConfig.from_config(cfg.model))
    stored = bf16_def.init(jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    save_init_params(tmp_path, stored)
    train_def = Components.from_config(cfg).model_def
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), train_def.shapes)
    params, fresh, unused = load_init_params(str(tmp_path), target)
    assert not fresh and not unused
    for (path, got), want in zip(param_paths(params).items(), param_paths(stored).values()):
        assert got.dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------- dropout


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dropout_masks_differ_between_steps_and_vanish_without_dropout(dropout):
    """The same parameters and batch at steps 0 and 1: with dropout the losses differ (a new mask per step),
    without it they are equal; and dropout > 0 trains (finite, the loss falls on a repeated batch)."""
    cfg = small_config("gpt2", **{"model.dropout": dropout, "optimizer.lr": 3e-3, "optimizer.warmup_steps": 0})
    _, state, step = _state_and_step(cfg)
    batch = _batch()
    at_1 = {**state, "step": state["step"] + 1}
    _, m0 = step(jax.tree.map(jnp.copy, state), batch)
    _, m1 = step(at_1, batch)
    if dropout:
        assert float(m0["loss"]) != float(m1["loss"])
    else:
        assert float(m0["loss"]) == float(m1["loss"])
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        assert bool(m["update_finite"])
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("overrides, named", [
    ({"optimizer.freeze": "embeddings"}, "optimizer.param_rules[0]"),
    ({"model.lora_rank": 4}, "optimizer.param_rules[0]"),
    ({}, "optimizer.param_rules[0]"),
])
def test_a_rule_error_names_the_user_s_rule_not_its_place_among_presets_and_lora(overrides, named):
    """Presets and LoRA add rules before the user's; an error must still point at the key the user wrote."""
    cfg = _small_config("llama", **overrides, **{"optimizer.param_rules": ((r"^no_such_param", "freeze"),)})
    with pytest.raises(ConfigError, match=rf"^{re.escape(named)}: regex '\^no_such_param' matches no parameter"):
        Components.from_config(cfg)


def test_a_preset_that_does_not_fit_the_model_is_named():
    cfg = _small_config("gpt2", **{"optimizer.freeze": "all_but_head"})  # GPT-2 ties its head to the embedding
    with pytest.raises(ConfigError, match=r"^optimizer.freeze='all_but_head': regex '\^head/' matches no parameter"):
        Components.from_config(cfg)
