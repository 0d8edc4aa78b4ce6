"""A new adapter method is one module plus a registry line (issue 18): a toy IA3-like method defined here, outside
lmtrain, and registered through the public `register_adapter`, trains with only its own parameters changing and
merges into the base weights, with no edit to lmtrain."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.model.adapters import ADAPTERS, AdapterMethod, merged_params, register_adapter, without_adapters
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.train.state import create_sharded_state
from lmtrain.train.trainer import Components
from tests.helpers import small_config


class OutputScale(nnx.Module):
    """IA3's learned per-output-channel scale s, initialised to ones: the projection computes (x W) * s."""

    def __init__(self, shape, axes, equation):
        w_spec = equation.split("->")[0].split(",")[1]
        n_in = sum(c in equation.split(",")[0] for c in w_spec)  # the contracted dims lead the weight's
        self.s = nnx.Param(jnp.ones(shape[n_in:], jnp.float32), logical_axes=axes[n_in:])

    def __call__(self, x, base, dtype, key=None):
        return base * (self.s[...].astype(dtype) - 1)  # dense() adds this to x W (+ bias): (x W) * s (+ bias)


class ToyIA3(AdapterMethod):
    name, prefix, title = "toy_ia3", "ia3_", "toy IA3"

    def build(self, cfg, shape, axes, equation, rngs):
        return OutputScale(shape, axes, equation)

    def merge(self, weight, adapter, cfg):
        n_out = adapter["s"].ndim  # s broadcasts over the weight's trailing (output) dims
        assert weight.shape[-n_out:] == adapter["s"].shape
        return (weight.astype(jnp.float32) * adapter["s"].astype(jnp.float32)).astype(weight.dtype)


@pytest.fixture
def toy_ia3():
    method = register_adapter(ToyIA3())
    yield method
    del ADAPTERS[method.name]


def _cfg(**kw):
    # lora_rank > 0 turns adapters on; the toy method ignores the rank (and alpha and dropout).
    return small_config("llama", **{"model.adapter": "toy_ia3", "model.lora_rank": 1,
                                    "model.lora_targets": ("q", "v", "up", "down"), "optimizer.lr": 1e-2, **kw})


def _batch(n=8, length=16):
    rng = np.random.default_rng(0)
    return {"inputs": rng.integers(0, 256, (n, length), dtype=np.int32),
            "targets": rng.integers(0, 256, (n, length), dtype=np.int32), "loss_mask": np.ones((n, length), np.float32),
            "segment_ids": np.ones((n, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy()}


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _all_params(parts, state) -> dict:
    """The trained and the frozen parameters (the state keeps them apart), on the host."""
    return jax.device_get(parts.plan.merge(state["params"], state["frozen"]))


def test_a_plugin_adapter_trains_only_its_parameters_and_merges_into_the_base(toy_ia3):
    cfg = _cfg()
    parts = Components.from_config(cfg)
    assert sorted(p for p, t in parts.plan.trainable.items() if t) == [
        f"blocks/{m}/ia3_{w}/s" for m, w in (("attn", "wq"), ("attn", "wv"), ("mlp", "w_in"), ("mlp", "w_out"))]
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    with axis_rules(mesh, cfg.mesh.axis_rules):
        state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, mesh, cfg.mesh.axis_rules, parts.plan)
        before = _flat(_all_params(parts, state))
        bs = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), cfg.mesh.axis_rules, mesh)[0], None))
        step = jax.jit(parts.train_step, in_shardings=(shardings, bs), out_shardings=(shardings, None))
        losses = []
        for _ in range(3):
            state, metrics = step(state, jax.device_put(_batch(), bs))
            losses.append(float(metrics["loss"]))
    params = _all_params(parts, state)
    after = _flat(params)
    assert losses[-1] < losses[0], losses
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if "'ia3_" in k}, changed  # every scale trained; the base is bit-identical
    assert all(np.all(before[k] == 1.0) for k in changed)  # a fresh adapter is the identity

    model_cfg = parts.model_def.cfg
    base_def = ModelDef(dataclasses.replace(model_cfg, lora_rank=0, lora_targets=()))
    tokens = _batch(2)["inputs"]
    adapted = np.asarray(parts.model_def.apply(params, tokens))
    merged = np.asarray(base_def.apply(merged_params(params, model_cfg), tokens))
    base = np.asarray(base_def.apply(without_adapters(params, model_cfg), tokens))
    assert "ia3_wq" not in merged_params(params, model_cfg)["blocks"]["attn"]  # merging removes the adapters
    # (x W) * s and x (W * s) differ only by float32 rounding (eps 1.2e-7) of products and of the sums over d_model
    # and through the blocks; 1e-5 of the logits' scale leaves room for that, and is far below what training moved.
    tol = 1e-5 * np.abs(adapted).max()
    assert np.abs(adapted - base).max() > 100 * tol  # the trained scales matter
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=tol)


def test_an_unknown_adapter_method_names_model_adapter():
    with pytest.raises(ConfigError, match=r"model.adapter='nope' is unknown. Adapter methods: lora"):
        ModelConfig.from_config(_cfg(**{"model.adapter": "nope"}).model)


def test_lora_is_the_default_method_and_the_registry_refuses_a_clashing_prefix(toy_ia3):
    assert ModelConfig.from_config(small_config("llama").model).adapter_method is ADAPTERS["lora"]

    class Clash(ToyIA3):
        name = "other"

    with pytest.raises(ValueError, match="prefix 'ia3_' is already 'toy_ia3'"):
        register_adapter(Clash())
    assert sorted(ADAPTERS) == ["lora", "toy_ia3"]
