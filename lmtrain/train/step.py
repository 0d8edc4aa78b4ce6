"""The pure train and eval steps: `(state, batch) -> (state, metrics)`, jitted once by the trainer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lmtrain.model import ModelDef
from lmtrain.parallel.partitioning import constrain
from lmtrain.train.optimizer import global_norm


def _valid_logits(logits_BxLxV, vocab_size: int):
    """float32 logits with the vocab's padding rows (index >= vocab_size) pushed to -inf."""
    logits = logits_BxLxV.astype(jnp.float32)
    if logits.shape[-1] > vocab_size:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy_and_log_z(logits_BxLxV, targets_BxL, vocab_size: int):
    """Per-token cross-entropy and log-normaliser log Z, both float32, from logits of any dtype.

    The backward pass writes d(logits) in one fused pass in the logits' own dtype,
    softmax * (g_ce + g_logz) - onehot * g_ce, instead of materialising float32 copies of the
    [batch, length, vocab] tensor: the largest activation of a small model's step.
    """
    return _ce_forward(logits_BxLxV, targets_BxL, vocab_size)[0]


def _ce_forward(logits_BxLxV, targets_BxL, vocab_size):
    logits = _valid_logits(logits_BxLxV, vocab_size)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return (log_z_BxL - target_logit_BxL, log_z_BxL), (logits_BxLxV, targets_BxL, log_z_BxL)


def _ce_backward(vocab_size, residuals, cotangents):
    logits_BxLxV, targets_BxL, log_z_BxL = residuals
    g_ce_BxL, g_log_z_BxL = cotangents
    softmax = jnp.exp(_valid_logits(logits_BxLxV, vocab_size) - log_z_BxL[..., None])
    onehot = jnp.arange(logits_BxLxV.shape[-1]) == targets_BxL[..., None]
    d_logits = softmax * (g_ce_BxL + g_log_z_BxL)[..., None] - jnp.where(onehot, g_ce_BxL[..., None], 0.0)
    return d_logits.astype(logits_BxLxV.dtype), None


cross_entropy_and_log_z.defvjp(lambda logits, targets, vocab: _ce_forward(logits, targets, vocab), _ce_backward)


def token_loss_sums(logits_BxLxV, targets_BxL, loss_mask_BxL, vocab_size: int):
    """Summed cross-entropy and summed (log Z)^2 over unmasked tokens, plus the token count.

    Logits of the padding rows of the vocab (index >= vocab_size) are excluded from the softmax.
    """
    ce_BxL, log_z_BxL = cross_entropy_and_log_z(logits_BxLxV, targets_BxL, vocab_size)
    mask = loss_mask_BxL.astype(jnp.float32)
    return jnp.sum(ce_BxL * mask), jnp.sum(jnp.square(log_z_BxL) * mask), jnp.sum(mask)


def _split_microbatches(batch: dict, k: int) -> dict:
    """[B, L] -> [k, B/k, L]. Row r goes to micro-batch r % k, so each device's rows spread over all k."""

    def split(x_BxL):
        b = x_BxL.shape[0]
        x = x_BxL.reshape(b // k, k, *x_BxL.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", "length"))

    return jax.tree.map(split, batch)


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, schedule, grad_accum: int,
                    z_loss: float, dropout: bool):
    vocab = model_def.cfg.vocab_size

    def loss_sums(params, batch, key):
        logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], key)
        ce_sum, z_sum, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
        return ce_sum + z_loss * z_sum, (ce_sum, z_sum, n)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]
        key = None
        if dropout:
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if grad_accum == 1:
            (_, (ce_sum, z_sum, n)), grads = grad_fn(params, batch, key)
        else:
            micro = _split_microbatches(batch, grad_accum)

            def accumulate(carry, xs):
                grads_acc, sums = carry
                mb, i = xs
                mb_key = None if key is None else jax.random.fold_in(key, i)
                (_, aux), g = grad_fn(params, mb, mb_key)
                return (jax.tree.map(jnp.add, grads_acc, g), jax.tree.map(jnp.add, sums, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, (jnp.float32(0), jnp.float32(0), jnp.float32(0)))
            (grads, (ce_sum, z_sum, n)), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {
            "loss": ce_sum / denom,
            "z_loss": z_sum / denom,
            "grad_norm": global_norm(grads),
            "param_norm": global_norm(params),
            "lr": schedule(state["step"]),
            "loss_tokens": n,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef):
    vocab = model_def.cfg.vocab_size

    def eval_step(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        ce_sum, _, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
        return ce_sum, n

    return eval_step
