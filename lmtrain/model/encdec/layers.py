"""The T5 block's parts: relative position buckets, unscaled attention with an additive bias, the ReLU and
gated-GELU feed-forwards, and the encoder / decoder block.

Built from the shared pieces of lmtrain.model.layers: every projection goes through `dense()` (so an adapter
wraps it), the norms are the shared `Norm` in its RMSNorm form, and every parameter carries logical axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.adapters import adapter_of, attach
from lmtrain.model.encdec.config import T5Config
from lmtrain.model.layers import Norm, _dropout, _keys, _param, dense
from lmtrain.parallel.partitioning import constrain


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each (key position - query position): exact buckets for small distances, logarithmic ones up
    to `max_distance`, one bucket beyond. Bidirectional (encoder) buckets keep the sign in their upper half; the
    decoder's (causal) ones see only keys at or before the query. Same float32 arithmetic as Mesh TensorFlow and
    transformers, so the buckets (and the logits) agree at the log-scale boundaries."""
    rel = jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    # max(rel, 1): log(0) is never selected below, but keep it finite
    scaled = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(rel < max_exact, rel, large)


def position_bias(table: nnx.Param, query_positions_T, key_positions_S, bidirectional: bool, cfg: T5Config):
    """The additive attention bias [1, N, T, S] of one stack, from its table [buckets, N] (shared by all layers)."""
    rel_TxS = key_positions_S[None, :] - query_positions_T[:, None]
    bucket_TxS = relative_position_bucket(rel_TxS, bidirectional, cfg.relative_buckets, cfg.relative_max_distance)
    bias_TxSxN = jnp.take(table[...], bucket_TxS, axis=0).astype(jnp.float32)
    return jnp.transpose(bias_TxSxN, (2, 0, 1))[None]


def attend_unscaled(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias_xNxTxS, mask_BxTxS):
    """Softmax attention as T5 has it: no 1/sqrt(head_dim) on the scores (the initialisation absorbs it), plus the
    relative position bias (None for cross-attention); `mask_BxTxS` is True where a query may see a key."""
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias=bias_xNxTxS, mask=mask_BxTxS[:, None],
                                        scale=1.0)


class T5Attention(nnx.Module):
    """Multi-head attention without biases; self-attention (keys from the queries' sequence) or cross-attention
    (keys and values from the encoder output, which a decoder computes once per layer and reuses)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, h, dt = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.weight_dtype
        # transformers' T5 initialisation (initializer_factor 1): the query absorbs the missing 1/sqrt(h)
        self.wq = _param(rngs.params(), (d, n, h), ("embed", "heads", "head_dim"), (d * h) ** -0.5, dt)
        self.wk = _param(rngs.params(), (d, n, h), ("embed", "heads", "head_dim"), d ** -0.5, dt)
        self.wv = _param(rngs.params(), (d, n, h), ("embed", "heads", "head_dim"), d ** -0.5, dt)
        self.wo = _param(rngs.params(), (n, h, d), ("heads", "head_dim", "embed"), (n * h) ** -0.5, dt)
        attach(self, "wq", cfg, "q", (d, n, h), ("embed", "heads", "head_dim"), "bld,dnh->blnh", rngs)
        attach(self, "wk", cfg, "k", (d, n, h), ("embed", "heads", "head_dim"), "bld,dnh->blnh", rngs)
        attach(self, "wv", cfg, "v", (d, n, h), ("embed", "heads", "head_dim"), "bld,dnh->blnh", rngs)
        attach(self, "wo", cfg, "o", (n, h, d), ("heads", "head_dim", "embed"), "blnh,nhd->bld", rngs)

    def query(self, x_BxTxD, key=None):
        q = dense(x_BxTxD, self.wq, "bld,dnh->blnh", self.cfg.compute_dtype, None, adapter_of(self, "wq"), key)
        return constrain(q, ("batch", "length", "act_heads", None))

    def keys_values(self, x_BxSxD, key=None):
        """Keys and values [B, S, N, H] of a sequence: the queries' own, or (cross-attention) the encoder output's."""
        k_key, v_key = _keys(key, 2)
        dtype = self.cfg.compute_dtype
        k = dense(x_BxSxD, self.wk, "bld,dnh->blnh", dtype, None, adapter_of(self, "wk"), k_key)
        v = dense(x_BxSxD, self.wv, "bld,dnh->blnh", dtype, None, adapter_of(self, "wv"), v_key)
        return constrain(k, ("batch", "length", "act_heads", None)), constrain(v, ("batch", "length", "act_heads", None))

    def out(self, o_BxTxNxH, key=None):
        y = dense(o_BxTxNxH, self.wo, "blnh,nhd->bld", self.cfg.compute_dtype, None, adapter_of(self, "wo"), key)
        return constrain(y, ("batch", "length", "act_embed"))


class T5MLP(nnx.Module):
    """T5 v1.0's relu(x W_in) W_out, or v1.1's (gelu_tanh(x W_gate) * x W_in) W_out; no biases."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, dt = cfg.d_model, cfg.d_ff, cfg.weight_dtype
        gated = cfg.mlp == "gated-gelu"
        self.w_in = _param(rngs.params(), (d, f), ("embed", "mlp"), d ** -0.5, dt)
        self.w_gate = _param(rngs.params(), (d, f), ("embed", "mlp"), d ** -0.5, dt) if gated else None
        self.w_out = _param(rngs.params(), (f, d), ("mlp", "embed"), f ** -0.5, dt)
        attach(self, "w_in", cfg, "up", (d, f), ("embed", "mlp"), "bld,df->blf", rngs)
        attach(self, "w_gate", cfg, "gate", (d, f), ("embed", "mlp"), "bld,df->blf", rngs)  # no gate: T5Config rejects it
        attach(self, "w_out", cfg, "down", (f, d), ("mlp", "embed"), "blf,fd->bld", rngs)

    def __call__(self, x_BxLxD, key=None):
        dtype = self.cfg.compute_dtype
        k_in, k_gate, k_out, k_drop = _keys(key, 4)
        h_BxLxF = dense(x_BxLxD, self.w_in, "bld,df->blf", dtype, None, adapter_of(self, "w_in"), k_in)
        if self.w_gate is None:
            h_BxLxF = jax.nn.relu(h_BxLxF)
        else:  # transformers' gelu_new: the tanh approximation
            gate_BxLxF = dense(x_BxLxD, self.w_gate, "bld,df->blf", dtype, None, adapter_of(self, "w_gate"), k_gate)
            h_BxLxF = jax.nn.gelu(gate_BxLxF, approximate=True) * h_BxLxF
        h_BxLxF = constrain(_dropout(h_BxLxF, self.cfg.dropout, k_drop), ("batch", "length", "act_mlp"))
        y_BxLxD = dense(h_BxLxF, self.w_out, "blf,fd->bld", dtype, None, adapter_of(self, "w_out"), k_out)
        return constrain(y_BxLxD, ("batch", "length", "act_embed"))


class T5Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), in the decoder x + cross(norm(x)), then x + mlp(norm(x)).

    The same code serves the encoder, the teacher-forced decoder and cached decoding (`cache` given)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, decoder: bool):
        self.cfg = cfg
        self.attn_norm = Norm(cfg)
        self.attn = T5Attention(cfg, rngs)
        self.cross_norm = Norm(cfg) if decoder else None
        self.cross = T5Attention(cfg, rngs) if decoder else None
        self.mlp_norm = Norm(cfg)
        self.mlp = T5MLP(cfg, rngs)

    def __call__(self, x_BxTxD, bias_xNxTxS, mask_BxTxS, cross=None, cache=None, key=None):
        """`cross` = (k_BxSxNxH, v_BxSxNxH, mask_BxTxS) of the encoder output (decoder only). Without `cache`, the
        T queries attend to each other. With `cache` = (k_BxCxNxH, v_BxCxNxH, slot), the T new tokens are written
        into the cache at `slot` and attend over it; the return is then (x, (k, v))."""
        keys = _keys(key, 9)
        rate = self.cfg.dropout
        h = self.attn_norm(x_BxTxD)
        q = self.attn.query(h, keys[0])
        k, v = self.attn.keys_values(h, keys[1])
        if cache is not None:
            k_cache, v_cache, slot = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, slot, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, slot, 0, 0))
            cache = (k, v)
        o = attend_unscaled(q, k.astype(q.dtype), v.astype(q.dtype), bias_xNxTxS.astype(q.dtype), mask_BxTxS)
        x_BxTxD = x_BxTxD + _dropout(self.attn.out(o, keys[2]), rate, keys[3])
        if self.cross is not None:
            enc_k, enc_v, enc_mask_BxTxS = cross
            q = self.cross.query(self.cross_norm(x_BxTxD), keys[4])
            o = attend_unscaled(q, enc_k.astype(q.dtype), enc_v.astype(q.dtype), None, enc_mask_BxTxS)
            x_BxTxD = x_BxTxD + _dropout(self.cross.out(o, keys[5]), rate, keys[6])
        x_BxTxD = x_BxTxD + _dropout(self.mlp(self.mlp_norm(x_BxTxD), keys[7]), rate, keys[8])
        x_BxTxD = constrain(x_BxTxD, ("batch", "length", "act_embed"))
        return x_BxTxD if cache is None else (x_BxTxD, cache)
