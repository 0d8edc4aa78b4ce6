"""The pure train and eval steps, `(state, batch) -> (state, metrics)`, jitted once by the trainer.

The step knows no task. A task hands it `loss_fn(params, batch, rng) -> (loss_sum, weight, metrics)`,
where `loss_sum` and every metric are sums over the batch and `weight` is what they are summed over
(tokens for language modelling, examples for classification). The step adds up micro-batches and
divides by the total weight once, so gradient accumulation equals one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lmtrain.parallel.partitioning import constrain
from lmtrain.param_rules import ParamPlan

LossFn = Callable[[dict, dict, jax.Array | None], tuple[jax.Array, jax.Array, dict]]


def _split_microbatches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...]. Row r goes to micro-batch r % k, so each device's rows spread over all k."""

    def split(x_Bx):
        b = x_Bx.shape[0]
        x = x_Bx.reshape(b // k, k, *x_Bx.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch") + ("length",) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree) -> jax.Array:
    """True when every entry of every array is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _masked(tree: dict, masks: dict, fn) -> dict:
    """Apply fn(leaf, mask_L) to the leaves that have a per-layer mask; the others pass unchanged."""
    return {k: (_masked(v, masks[k], fn) if isinstance(v, dict) else fn(v, masks[k])) if k in masks else v
            for k, v in tree.items()}


def _layers_like(mask_L, x):
    return jnp.asarray(mask_L).reshape((-1,) + (1,) * (x.ndim - 1))


def _masked_pair(new: dict, old: dict, masks: dict) -> dict:
    """`new` where the mask trains the block, `old` (bit for bit) where it is frozen."""
    return {k: (_masked_pair(v, old[k], masks[k]) if isinstance(v, dict) else jnp.where(_layers_like(masks[k], v), v, old[k]))
            if k in masks else v for k, v in new.items()}


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, grad_accum: int, layer_masks: dict | None = None):
    """The jittable step. Gradients are taken and accumulated in the parameters' dtype (float32
    master weights); `update_finite` tells the loop whether the new parameters may be saved.

    `state["params"]` holds the trainable parameters only: they are differentiated and updated, and
    the optimizer state mirrors them. `state["frozen"]` (the rest: a frozen base under LoRA, frozen
    layers) joins them in the forward pass and passes through unchanged, bit for bit.

    `layer_masks` ({path: bool [n_layers]}) freezes some blocks of a stacked parameter: their gradient is
    zeroed before the optimizer (so clipping and moments ignore them) and their values are kept exactly
    (weight decay included).
    """
    layer_masks = layer_masks or {}

    def objective(trainable, frozen, batch, rng):
        loss_sum, weight, metrics = loss_fn(ParamPlan.merge(trainable, frozen), batch, rng)
        return loss_sum, (weight, metrics)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        params, frozen = state["params"], state.get("frozen", {})
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if grad_accum == 1:
            (loss_sum, (weight, sums)), grads = grad_fn(params, frozen, batch, rng)
        else:
            micro = _split_microbatches(batch, grad_accum)

            def accumulate(carry, xs):
                mb, i = xs
                (loss_i, (weight_i, sums_i)), grads_i = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (grads_i, loss_i, weight_i, sums_i)), None

            first = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro), rng))
            (_, (_, sums_shape)), _ = first
            zeros = (
                jax.tree.map(jnp.zeros_like, params),
                jnp.float32(0),
                jnp.float32(0),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
            )
            (grads, loss_sum, weight, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grads = _masked(grads, layer_masks, lambda g, m: jnp.where(_layers_like(m, g), g, 0))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        old = params
        params = optax.apply_updates(params, updates)
        if layer_masks:
            params = _masked_pair(params, old, layer_masks)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {
            "loss": loss_sum / denom,
            **{k: v / denom for k, v in sums.items()},
            "grad_norm": global_norm(grads),
            "param_norm": global_norm(params),
            "update_finite": all_finite(params),
            "weight": weight,
        }
        return new_state, metrics

    return train_step
