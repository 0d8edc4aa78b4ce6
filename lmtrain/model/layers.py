"""Building blocks of the transformer: norms, embeddings, rotary positions, attention and MLPs.

Every parameter carries `logical_axes` metadata; activations are pinned with `constrain`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.parallel.partitioning import constrain


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model hyper-parameters (hashable, so modules can close over them)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    head_dim: int = 0
    vocab_pad_multiple: int = 128
    pos_embedding: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # () or ('llama3', factor, low_freq_factor, high_freq_factor, original_max_positions)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    use_bias: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    logits_dtype: str = "float32"

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_cfg.items() if k in fields}
        if "rope_scaling" in values:
            values["rope_scaling"] = tuple(values["rope_scaling"] or ())
        return cls(**values)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        m = max(1, self.vocab_pad_multiple)
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)


def _param(key, shape, axes, std, dtype) -> nnx.Param:
    value = std * jax.random.normal(key, shape, jnp.float32) if std else jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


class Norm(nnx.Module):
    """LayerNorm (with optional bias) or RMSNorm, always computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.kind, self.eps, self.out_dtype = cfg.norm, cfg.norm_eps, cfg.compute_dtype
        self.scale = _ones((cfg.d_model,), (None,), cfg.weight_dtype)
        self.bias = _param(None, (cfg.d_model,), (None,), 0, cfg.weight_dtype) if cfg.use_bias else None

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.out_dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """Per-pair rotation frequencies, with Llama-3 style long-context scaling when configured."""
    hd = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling and cfg.rope_scaling[0] == "llama3":
        _, factor, low_ff, high_ff, original = cfg.rope_scaling
        low_wavelen, high_wavelen = original / low_ff, original / high_ff
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = jnp.where(is_mid, mid, scaled)
    return inv_freq


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout used by Hugging Face Llama checkpoints."""
    angles_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxLxH2)[:, :, None, :]
    sin = jnp.sin(angles_BxLxH2)[:, :, None, :]
    x = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxH.dtype)


ATTENTION_CHUNK = 256


def _attention_impl(cfg: ModelConfig, dtype, length: int) -> str:
    """'auto' picks cuDNN flash attention on GPU (bf16/fp16), query-chunked attention for long
    sequences on CPU, and XLA's fused attention otherwise."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    backend = jax.default_backend()
    if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "cpu" and length >= 2 * ATTENTION_CHUNK and length % ATTENTION_CHUNK == 0:
        return "chunked"
    return "xla"


def chunked_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None, chunk: int = ATTENTION_CHUNK):
    """Causal attention computed one block of `chunk` queries at a time against only the keys at or
    before the block: half the FLOPs of the full masked product and a [chunk, T] score tile instead
    of [T, T]. Same result as jax.nn.dot_product_attention(is_causal=True) with the segment mask."""
    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxTxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    outs = []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH[:, start:stop], k_BxTxKxH[:, :stop],
                            preferred_element_type=jnp.float32) / math.sqrt(h)
        mask_TxS = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        if segment_ids_BxT is not None:
            same_BxTxS = segment_ids_BxT[:, start:stop, None] == segment_ids_BxT[:, None, :stop]
            mask = (mask_TxS & same_BxTxS)[:, None, None]
        else:
            mask = mask_TxS
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1).astype(v_BxTxKxH.dtype)
        outs.append(jnp.einsum("bkgts,bskh->btkgh", probs, v_BxTxKxH[:, :stop]))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


def _dropout(x, rate: float, key):
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head causal self-attention with grouped-query heads and document (segment) masking."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, nh, nkv, hd, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.weight_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.wq = _param(rngs.params(), (d, nh, hd), ("embed", "heads", "head_dim"), cfg.init_std, dt)
        self.wk = _param(rngs.params(), (d, nkv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std, dt)
        self.wv = _param(rngs.params(), (d, nkv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std, dt)
        self.wo = _param(rngs.params(), (nh, hd, d), ("heads", "head_dim", "embed"), out_std, dt)
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        self.bq = _param(None, (nh, hd), ("heads", "head_dim"), 0, dt) if qkv_bias else None
        self.bk = _param(None, (nkv, hd), ("kv_heads", "head_dim"), 0, dt) if qkv_bias else None
        self.bv = _param(None, (nkv, hd), ("kv_heads", "head_dim"), 0, dt) if qkv_bias else None
        self.bo = _param(None, (d,), ("embed",), 0, dt) if cfg.use_bias else None

    def project_qkv(self, x_BxLxD, positions_BxL):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        q_BxLxNxH = jnp.einsum("bld,dnh->blnh", x_BxLxD, self.wq[...].astype(dtype))
        k_BxLxKxH = jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wk[...].astype(dtype))
        v_BxLxKxH = jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wv[...].astype(dtype))
        if self.bq is not None:
            q_BxLxNxH = q_BxLxNxH + self.bq[...].astype(dtype)
            k_BxLxKxH = k_BxLxKxH + self.bk[...].astype(dtype)
            v_BxLxKxH = v_BxLxKxH + self.bv[...].astype(dtype)
        if cfg.pos_embedding == "rope":
            inv_freq = rope_inverse_frequencies(cfg)
            q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, inv_freq)
            k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, inv_freq)
        q_BxLxNxH = constrain(q_BxLxNxH, ("batch", "length", "act_heads", None))
        k_BxLxKxH = constrain(k_BxLxKxH, ("batch", "length", "act_kv_heads", None))
        v_BxLxKxH = constrain(v_BxLxKxH, ("batch", "length", "act_kv_heads", None))
        return q_BxLxNxH, k_BxLxKxH, v_BxLxKxH

    def project_out(self, out_BxLxNxH):
        dtype = self.cfg.compute_dtype
        y_BxLxD = jnp.einsum("blnh,nhd->bld", out_BxLxNxH, self.wo[...].astype(dtype))
        if self.bo is not None:
            y_BxLxD = y_BxLxD + self.bo[...].astype(dtype)
        return constrain(y_BxLxD, ("batch", "length", "act_embed"))

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None):
        q, k, v = self.project_qkv(x_BxLxD, positions_BxL)
        impl = _attention_impl(self.cfg, q.dtype, q.shape[1])
        if impl == "chunked":
            return self.project_out(chunked_causal_attention(q, k, v, segment_ids_BxL))
        mask_Bx1xLxL = None
        if segment_ids_BxL is not None:
            mask_Bx1xLxL = (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
        out_BxLxNxH = jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxL, is_causal=True, implementation=impl)
        return self.project_out(out_BxLxNxH)


class MLP(nnx.Module):
    """GELU MLP with biases (GPT-2) or bias-free SwiGLU (Llama)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, dt = cfg.d_model, cfg.d_ff, cfg.weight_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.w_in = _param(rngs.params(), (d, f), ("embed", "mlp"), cfg.init_std, dt)
        self.w_gate = _param(rngs.params(), (d, f), ("embed", "mlp"), cfg.init_std, dt) if cfg.mlp == "swiglu" else None
        self.w_out = _param(rngs.params(), (f, d), ("mlp", "embed"), out_std, dt)
        self.b_in = _param(None, (f,), ("mlp",), 0, dt) if cfg.use_bias else None
        self.b_out = _param(None, (d,), ("embed",), 0, dt) if cfg.use_bias else None

    def __call__(self, x_BxLxD):
        dtype = self.cfg.compute_dtype
        h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_in[...].astype(dtype))
        if self.b_in is not None:
            h_BxLxF = h_BxLxF + self.b_in[...].astype(dtype)
        if self.w_gate is not None:
            gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate[...].astype(dtype))
            h_BxLxF = jax.nn.silu(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
        y_BxLxD = jnp.einsum("blf,fd->bld", h_BxLxF, self.w_out[...].astype(dtype))
        if self.b_out is not None:
            y_BxLxD = y_BxLxD + self.b_out[...].astype(dtype)
        return constrain(y_BxLxD, ("batch", "length", "act_embed"))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, dropout_key=None):
        k1 = k2 = None
        if dropout_key is not None:
            k1, k2 = jax.random.split(dropout_key)
        h = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
        x_BxLxD = x_BxLxD + _dropout(h, self.cfg.dropout, k1)
        h = self.mlp(self.mlp_norm(x_BxLxD))
        return x_BxLxD + _dropout(h, self.cfg.dropout, k2)
