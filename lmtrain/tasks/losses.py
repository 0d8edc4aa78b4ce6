"""Losses shared by tasks: a memory-lean token cross-entropy over the padded vocab, and a
cross-entropy over class logits. Each returns sums; the task divides by the global weight."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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


def class_cross_entropy(logits_BxC, labels_B):
    """Per-example cross-entropy of class logits, float32."""
    logits = logits_BxC.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels_B[:, None], axis=-1)[:, 0]
