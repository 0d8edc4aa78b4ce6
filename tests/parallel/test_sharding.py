"""Sharded equals unsharded: loss and gradients after 3 steps agree on every mesh (8 fake CPU devices)."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.config import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.tasks.losses import token_loss_sums
from lmtrain.train.state import create_sharded_state
from lmtrain.train.trainer import Components
from tests.helpers import small_config

pytestmark = pytest.mark.multidevice

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]


def _batches(cfg, n=3, seed=0):
    rng = np.random.default_rng(seed)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        seg = np.where(np.arange(length) < rng.integers(4, length - 4, size=(b, 1)), 1, 2).astype(np.int32)
        pos = np.where(seg == 1, np.arange(length), np.arange(length) - (seg == 1).sum(1, keepdims=True))
        out.append({
            "inputs": rng.integers(0, cfg.model.vocab_size, (b, length), dtype=np.int32),
            "targets": rng.integers(0, cfg.model.vocab_size, (b, length), dtype=np.int32),
            "loss_mask": (rng.random((b, length)) > 0.1).astype(np.float32),
            "segment_ids": seg,
            "positions": pos.astype(np.int32),
        })
    return out


def _run(cfg, mesh_shape, batches):
    mesh = make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    rules = cfg.mesh.axis_rules
    parts = Components.from_config(cfg)
    model_def = parts.model_def
    with axis_rules(mesh, rules):
        state, shardings, _ = create_sharded_state(model_def, parts.tx, 0, mesh, rules, parts.plan)
        initial_params = jax.tree.map(lambda x: x.copy(), state["params"])  # the step donates the state
        batch_sharding = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0], None))
        step = jax.jit(parts.train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
        losses = []
        for b in batches:
            state, m = step(state, jax.device_put(b, batch_sharding))
            losses.append(float(m["loss"]))

        def loss_fn(params, batch):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
            ce, _, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"], cfg.model.vocab_size)
            return ce / n

        # Gradients at the initial parameters, which are identical on every mesh: after a few steps the
        # parameters themselves differ by rounding, and so would their gradients.
        grads = jax.jit(jax.grad(loss_fn), in_shardings=(shardings["params"], batch_sharding))(
            initial_params, jax.device_put(batches[0], batch_sharding))
    return np.array(losses), jax.device_get(grads), shardings


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_equals_unsharded(family):
    cfg = small_config(family, **{"train.z_loss": 1e-4})
    batches = _batches(cfg)
    ref_losses, ref_grads, _ = _run(cfg, MESHES[0], batches)
    assert np.all(np.isfinite(ref_losses)) and ref_losses[0] > ref_losses[-1] - 1.0
    for mesh_shape in MESHES[1:]:
        losses, grads, shardings = _run(cfg, mesh_shape, batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=f"losses differ on mesh {mesh_shape}")
        flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
        flat = jax.tree.leaves(grads)
        for (path, g_ref), g in zip(flat_ref, flat):
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-7,
                                       err_msg=f"gradient {jax.tree_util.keystr(path)} differs on mesh {mesh_shape}")
        # The mesh is really used: the attention weights are split as the rules say.
        wq_spec = shardings["params"]["blocks"]["attn"]["wq"].spec
        if mesh_shape == (1, 8, 1):
            assert wq_spec[1] == "fsdp", wq_spec
        if mesh_shape == (2, 2, 2):
            assert wq_spec[1] == "fsdp" and wq_spec[2] == "tensor", wq_spec


def test_uneven_parameter_sharding_names_the_parameter():
    cfg = small_config("llama")
    with cfg.unlocked():
        cfg.model.d_ff = 102  # 102 does not split over tensor=4
        cfg.model.n_kv_heads = 4
    model_def = ModelDef(ModelConfig.from_config(cfg.model))
    from lmtrain.parallel.partitioning import param_shardings

    mesh = make_mesh((1, 1, 4), jax.devices()[:4])
    with pytest.raises(ConfigError, match=r"blocks/mlp/w_(gate|in).*size 102.*mlp"):
        param_shardings(model_def.logical_axes, mesh, cfg.mesh.axis_rules, model_def.shapes)
