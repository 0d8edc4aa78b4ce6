"""Building blocks of the transformer: norms, embeddings, rotary positions, attention and MLPs.

Every parameter carries `logical_axes` metadata; activations are pinned with `constrain`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.adapters import adapter_method, adapter_of, attach
from lmtrain.model.attention import attend
from lmtrain.parallel.partitioning import constrain
from lmtrain.param_rules import resolve_targets


class SharedModelProperties:
    """What every model kind's config derives the same way from its fields (vocab_size, vocab_pad_multiple, dtype,
    param_dtype, adapter), for the shared blocks: ModelConfig and the T5 encoder-decoder's T5Config."""

    @property
    def adapter_method(self):
        """The `model.adapter` method (lmtrain.model.adapters), which param_rules asks what trains."""
        return adapter_method(self)

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


@dataclasses.dataclass(frozen=True)
class ModelConfig(SharedModelProperties):
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
    attention_dropout: float = 0.0  # on the attention probabilities (BERT's attention_probs_dropout_prob)
    classifier_dropout: float = 0.0  # on a classify/token_classify head's input (BERT's classifier dropout)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    logits_dtype: str = "float32"
    causal: bool = True  # False: bidirectional attention over non-padding tokens (encoders)
    head: str = "lm"  # output head, a name in lmtrain.model.heads.HEADS
    num_labels: int = 0  # classes of a classification head
    # Encoder (BERT) family options; the defaults are the decoders' and change nothing there.
    type_vocab_size: int = 0  # token-type (sentence A/B) embeddings added to the input; 0: none
    norm_position: str = "pre"  # 'pre': x + f(norm(x)) and a final norm; 'post' (BERT): norm(x + f(x)), no final norm
    embed_norm: bool = False  # a norm over the summed input embeddings (BERT)
    pooling: str = "last"  # classify head: the 'last' real token (decoders) or 'cls': the first token via dense+tanh
    lora_rank: int = 0  # LoRA adapters of this rank on lora_targets (0: none)
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_dropout: float = 0.0  # dropout on an adapter's input (training only)
    lora_targets: tuple = ()  # projections to adapt: q, k, v, o, gate, up, down (or family names: q_proj, c_attn, ...)
    adapter: str = "lora"  # the adapter method (lmtrain.model.adapters.ADAPTERS) when lora_rank > 0

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_cfg.items() if k in fields}
        if "rope_scaling" in values:
            values["rope_scaling"] = tuple(values["rope_scaling"] or ())
        if values.get("lora_rank"):
            values["lora_targets"] = resolve_targets(tuple(values.get("lora_targets") or ()), values.get("mlp", "swiglu"))
        else:
            values["lora_targets"] = ()
        cfg = cls(**values)
        if cfg.lora_rank:
            adapter_method(cfg).check(cfg)  # an unknown model.adapter is a ConfigError here
        return cfg

    def for_training(self) -> ModelConfig:
        """Training keeps float32 master weights (and optimizer state) whatever the storage dtype;
        `dtype` still sets the compute precision."""
        return dataclasses.replace(self, param_dtype="float32")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads



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


def _dropout(x, rate: float, key):
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dense(x, kernel: nnx.Param, equation: str, dtype, bias: nnx.Param | None = None, adapter=None, key=None):
    """Every projection of the model goes through here: `einsum(equation, x, kernel)` in the compute
    dtype, plus an optional bias and an optional adapter's contribution (`lmtrain.model.adapters`; `key`
    drives its dropout). A new adapter method wraps this one function, not each einsum."""
    base = jnp.einsum(equation, x, kernel[...].astype(dtype))
    y = base if bias is None else base + bias[...].astype(dtype)
    if adapter is not None:  # the adapter sees the input and the bias-free projection (IA3-like methods scale it)
        y = y + adapter(x, base, dtype, key)
    return y


def _keys(key, n: int) -> list:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    """Multi-head self-attention (causal, or bidirectional for encoders) with grouped-query heads,
    document (segment) masking, and an optional KV cache for decoding."""

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
        attach(self, "wq", cfg, "q", (d, nh, hd), ("embed", "heads", "head_dim"), "bld,dnh->blnh", rngs)
        attach(self, "wk", cfg, "k", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), "bld,dkh->blkh", rngs)
        attach(self, "wv", cfg, "v", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), "bld,dkh->blkh", rngs)
        attach(self, "wo", cfg, "o", (nh, hd, d), ("heads", "head_dim", "embed"), "blnh,nhd->bld", rngs)

    def project_qkv(self, x_BxLxD, positions_BxL, key=None):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        kq, kk, kv = _keys(key, 3)
        q_BxLxNxH = dense(x_BxLxD, self.wq, "bld,dnh->blnh", dtype, self.bq, adapter_of(self, "wq"), kq)
        k_BxLxKxH = dense(x_BxLxD, self.wk, "bld,dkh->blkh", dtype, self.bk, adapter_of(self, "wk"), kk)
        v_BxLxKxH = dense(x_BxLxD, self.wv, "bld,dkh->blkh", dtype, self.bv, adapter_of(self, "wv"), kv)
        if cfg.pos_embedding == "rope":
            inv_freq = rope_inverse_frequencies(cfg)
            q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, inv_freq)
            k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, inv_freq)
        q_BxLxNxH = constrain(q_BxLxNxH, ("batch", "length", "act_heads", None))
        k_BxLxKxH = constrain(k_BxLxKxH, ("batch", "length", "act_kv_heads", None))
        v_BxLxKxH = constrain(v_BxLxKxH, ("batch", "length", "act_kv_heads", None))
        return q_BxLxNxH, k_BxLxKxH, v_BxLxKxH

    def project_out(self, out_BxLxNxH, key=None):
        y_BxLxD = dense(out_BxLxNxH, self.wo, "blnh,nhd->bld", self.cfg.compute_dtype, self.bo, adapter_of(self, "wo"), key)
        return constrain(y_BxLxD, ("batch", "length", "act_embed"))

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, kv=None, key=None, probs_key=None):
        """Without `kv`: the attention output. With `kv` = (k_BxTxKxH, v_BxTxKxH, slot, mask_BxLxT), the
        L new tokens are written into the cache at `slot` and attend over it: (output, (k, v)).
        `key` drives the adapters' dropout, `probs_key` the attention-probability dropout (training only)."""
        k_in, k_out = _keys(key, 2)
        q, k, v = self.project_qkv(x_BxLxD, positions_BxL, k_in)
        if kv is None:
            out = attend(q, k, v, segment_ids_BxT=segment_ids_BxL, causal=self.cfg.causal, impl=self.cfg.attention_impl,
                         dropout_rate=self.cfg.attention_dropout, dropout_key=probs_key)
            return self.project_out(out, k_out)
        k_cache_BxTxKxH, v_cache_BxTxKxH, slot, mask_BxLxT = kv
        k_cache_BxTxKxH = jax.lax.dynamic_update_slice(k_cache_BxTxKxH, k.astype(k_cache_BxTxKxH.dtype), (0, slot, 0, 0))
        v_cache_BxTxKxH = jax.lax.dynamic_update_slice(v_cache_BxTxKxH, v.astype(v_cache_BxTxKxH.dtype), (0, slot, 0, 0))
        out = attend(q, k_cache_BxTxKxH.astype(q.dtype), v_cache_BxTxKxH.astype(q.dtype), mask_BxTxS=mask_BxLxT)
        return self.project_out(out), (k_cache_BxTxKxH, v_cache_BxTxKxH)


class MLP(nnx.Module):
    """GELU MLP with biases (GPT-2: tanh GELU, BERT: exact erf GELU, `mlp='gelu_exact'`) or bias-free SwiGLU (Llama)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, dt = cfg.d_model, cfg.d_ff, cfg.weight_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.w_in = _param(rngs.params(), (d, f), ("embed", "mlp"), cfg.init_std, dt)
        self.w_gate = _param(rngs.params(), (d, f), ("embed", "mlp"), cfg.init_std, dt) if cfg.mlp == "swiglu" else None
        self.w_out = _param(rngs.params(), (f, d), ("mlp", "embed"), out_std, dt)
        self.b_in = _param(None, (f,), ("mlp",), 0, dt) if cfg.use_bias else None
        self.b_out = _param(None, (d,), ("embed",), 0, dt) if cfg.use_bias else None
        attach(self, "w_in", cfg, "up", (d, f), ("embed", "mlp"), "bld,df->blf", rngs)
        attach(self, "w_gate", cfg, "gate", (d, f), ("embed", "mlp"), "bld,df->blf", rngs)
        attach(self, "w_out", cfg, "down", (f, d), ("mlp", "embed"), "blf,fd->bld", rngs)

    def __call__(self, x_BxLxD, key=None):
        dtype = self.cfg.compute_dtype
        k_in, k_gate, k_out = _keys(key, 3)
        h_BxLxF = dense(x_BxLxD, self.w_in, "bld,df->blf", dtype, self.b_in, adapter_of(self, "w_in"), k_in)
        if self.w_gate is not None:
            gate_BxLxF = dense(x_BxLxD, self.w_gate, "bld,df->blf", dtype, None, adapter_of(self, "w_gate"), k_gate)
            h_BxLxF = jax.nn.silu(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=self.cfg.mlp != "gelu_exact")
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
        y_BxLxD = dense(h_BxLxF, self.w_out, "blf,fd->bld", dtype, self.b_out, adapter_of(self, "w_out"), k_out)
        return constrain(y_BxLxD, ("batch", "length", "act_embed"))


class Block(nnx.Module):
    """Transformer block. Pre-norm (decoders): x + attn(norm(x)), then x + mlp(norm(x)). Post-norm
    (`norm_position='post'`, BERT): norm(x + attn(x)), then norm(x + mlp(x)); the norms keep their names.

    The same code serves training (no `kv`) and cached decoding (`kv` given: returns (x, new kv)).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, dropout_key=None, kv=None):
        k1 = k2 = k_attn = k_mlp = k_probs = None
        if dropout_key is not None:
            k1, k2 = jax.random.split(dropout_key)
            if self.cfg.lora_dropout > 0:
                k_attn, k_mlp = jax.random.fold_in(dropout_key, 3), jax.random.fold_in(dropout_key, 4)
            if self.cfg.attention_dropout > 0:
                k_probs = jax.random.fold_in(dropout_key, 5)
        post = self.cfg.norm_position == "post"
        h = self.attn(x_BxLxD if post else self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, kv, k_attn, k_probs)
        if kv is not None:
            h, kv = h
        x_BxLxD = x_BxLxD + _dropout(h, self.cfg.dropout, k1)
        if post:
            x_BxLxD = self.attn_norm(x_BxLxD)
        h = self.mlp(x_BxLxD if post else self.mlp_norm(x_BxLxD), k_mlp)
        x_BxLxD = x_BxLxD + _dropout(h, self.cfg.dropout, k2)
        if post:
            x_BxLxD = self.mlp_norm(x_BxLxD)
        return x_BxLxD if kv is None else (x_BxLxD, kv)
