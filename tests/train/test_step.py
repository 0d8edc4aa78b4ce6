"""The loss: the hand-written cross-entropy gradient equals autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.tasks.losses import token_loss_sums


def _plain_loss_sums(logits, targets, mask, vocab):
    logits = logits.astype(jnp.float32)[..., :vocab]
    log_z = jax.nn.logsumexp(logits, -1)
    ce = log_z - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.sum(ce * mask), jnp.sum(log_z**2 * mask), jnp.sum(mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_gradient_matches_autodiff(dtype):
    rng = np.random.default_rng(0)
    vocab, padded = 50, 64  # padding rows must get no probability and no gradient
    logits = jnp.asarray(rng.normal(size=(3, 7, padded)) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (3, 7)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 7)) > 0.3, jnp.float32)

    def total(fn, x):
        ce, z, n = fn(x, targets, mask, vocab)
        return (ce + 1e-2 * z) / n

    ours_val, ours_grad = jax.value_and_grad(lambda x: total(token_loss_sums, x))(logits)
    ref_val, ref_grad = jax.value_and_grad(lambda x: total(_plain_loss_sums, x))(logits)
    assert ours_grad.dtype == dtype
    np.testing.assert_allclose(ours_val, ref_val, rtol=1e-6)
    tol = 1e-7 if dtype == jnp.float32 else 2e-3
    np.testing.assert_allclose(np.asarray(ours_grad, np.float32), np.asarray(ref_grad, np.float32), atol=tol)
    assert np.all(np.asarray(ours_grad[..., vocab:], np.float32) == 0)
