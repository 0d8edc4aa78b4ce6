"""Greedy decoding for the encoder-decoder: encode once, project each decoder layer's cross-attention keys and
values from the encoder output once, then decode token by token against a decoder self-attention KV cache.

Rows of different input lengths share one batch: the inputs are padded (on either side; T5's positions are
relative) and the padding is masked out of every cross-attention. All rows decode from the decoder start
token in step; a row that has emitted EOS emits padding from then on, as transformers' `generate` does. The
whole loop (a scan over a fixed-size cache) is one jitted function, compiled once per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.model.encdec.model import T5ModelDef


def pad_inputs(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded input ids [B, S] and their mask (True on real tokens) from token lists of any lengths."""
    if not rows or not all(rows):
        raise ValueError("every encoder input needs at least one token")
    width = max(len(r) for r in rows)
    tokens_BxS = np.full((len(rows), width), pad_id, np.int32)
    mask_BxS = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens_BxS[i, : len(row)] = row
        mask_BxS[i, : len(row)] = True
    return tokens_BxS, mask_BxS


def cross_keys_values(model, enc_BxSxD):
    """Every decoder layer's cross-attention keys and values [L, B, S, N, H], computed once per input."""
    block_def, block_state = nnx.split(model.decoder.blocks)
    return jax.vmap(lambda layer_state: nnx.merge(block_def, layer_state).cross.keys_values(enc_BxSxD))(block_state)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(model_def: T5ModelDef, params, enc_tokens_BxS, enc_mask_BxS, max_new_tokens: int):
    cfg = model_def.cfg
    model = model_def.bind(params)
    decoder = model.decoder
    enc_BxSxD = model.encode(enc_tokens_BxS, enc_mask_BxS)
    cross_k, cross_v = cross_keys_values(model, enc_BxSxD)
    block_def, block_state = nnx.split(decoder.blocks)
    n_layers, b = cross_k.shape[0], enc_tokens_BxS.shape[0]
    cache_shape = (n_layers, b, max_new_tokens, cfg.n_heads, cfg.head_dim)
    cache_k = jnp.zeros(cache_shape, cfg.compute_dtype)
    cache_v = jnp.zeros(cache_shape, cfg.compute_dtype)
    enc_mask_Bx1xS = enc_mask_BxS[:, None, :].astype(bool)
    slots_C = jnp.arange(max_new_tokens)

    def step(carry, slot):
        token_B, done_B, cache_k, cache_v = carry
        x_Bx1xD = model.embed_tokens(token_B[:, None])
        bias_1xNx1xC = decoder.bias(slot[None], slots_C)
        mask_Bx1xC = jnp.broadcast_to(slots_C <= slot, (b, 1, max_new_tokens))

        def layer(x, xs):
            layer_state, k, v, enc_k, enc_v = xs
            block = nnx.merge(block_def, layer_state)
            return block(x, bias_1xNx1xC, mask_Bx1xC, (enc_k, enc_v, enc_mask_Bx1xS), cache=(k, v, slot))

        x_Bx1xD, (cache_k, cache_v) = jax.lax.scan(layer, x_Bx1xD, (block_state, cache_k, cache_v, cross_k, cross_v))
        logits_BxV = model.logits(decoder.finish(x_Bx1xD))[:, 0, : cfg.vocab_size]
        next_B = jnp.where(done_B, cfg.pad_id, jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))
        done_B = done_B | (next_B == cfg.eos_id)
        return (next_B, done_B, cache_k, cache_v), next_B

    start_B = jnp.full((b,), cfg.decoder_start_id, jnp.int32)
    _, tokens_CxB = jax.lax.scan(step, (start_B, jnp.zeros((b,), bool), cache_k, cache_v), slots_C)
    return tokens_CxB.T


def generate_greedy(model_def: T5ModelDef, params: dict, enc_tokens_BxS, enc_mask_BxS, max_new_tokens: int) -> np.ndarray:
    """The greedy continuation [B, max_new_tokens] of each row (without the decoder start token); after a row's
    EOS, `pad_id`."""
    out = _greedy(model_def, params, jnp.asarray(enc_tokens_BxS, jnp.int32), jnp.asarray(enc_mask_BxS, bool),
                  int(max_new_tokens))
    return np.asarray(out)
