"""Output heads: what the transformer's final hidden states become.

A head is a module with `__call__(x_BxLxD, *, embed, segment_ids_BxL)`; it takes what it needs
(the LM head may reuse the token embedding, a classifier reads the last real token). The model
picks one by `model.head`; adding a head is one class here and one line in `HEADS`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.layers import ModelConfig, _param
from lmtrain.parallel.partitioning import constrain


class LMHead(nnx.Module):
    """Next-token logits over the padded vocab, in `logits_dtype`; tied to the embedding when
    `tie_embeddings` (then it has no parameter of its own)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.w = None if cfg.tie_embeddings else _param(
            rngs.params(), (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg.init_std, cfg.weight_dtype)

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None):
        dtype = self.cfg.compute_dtype
        w_DxV = embed[...].astype(dtype).T if self.w is None else self.w[...].astype(dtype)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV, preferred_element_type=jnp.dtype(self.cfg.logits_dtype))
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))


def last_token_index(segment_ids_BxL, length: int) -> jax.Array:
    """Index of each row's last real (segment id > 0) token; the last slot when there is no padding info."""
    if segment_ids_BxL is None:
        return jnp.full((1,), length - 1, jnp.int32)
    slots_L = jnp.arange(length, dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids_BxL > 0, slots_L, 0), axis=-1)


class SequenceClassifierHead(nnx.Module):
    """Class logits from the hidden state of each row's last real token, as Hugging Face's
    `*ForSequenceClassification` decoders do (a bias-free `score` projection)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.num_labels < 2:
            raise ValueError(f"model.num_labels={cfg.num_labels}: a classification head needs at least 2 classes.")
        self.cfg = cfg
        self.score = _param(rngs.params(), (cfg.d_model, cfg.num_labels), ("embed", None), cfg.init_std, cfg.weight_dtype)

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None):
        last_B = last_token_index(segment_ids_BxL, x_BxLxD.shape[1])
        pooled_BxD = jnp.take_along_axis(x_BxLxD, jnp.broadcast_to(last_B, x_BxLxD.shape[:1])[:, None, None], axis=1)[:, 0]
        return jnp.einsum("bd,dc->bc", pooled_BxD.astype(jnp.float32), self.score[...].astype(jnp.float32))


HEADS = {
    "lm": LMHead,
    "classify": SequenceClassifierHead,
}
