"""Llama and the families that share its layout: Mistral (Llama's tensors; a sliding window lmtrain reads as a
shorter context) and Qwen2 (Llama with q/k/v biases). RoPE, RMSNorm, SwiGLU, torch Linear projections."""

from __future__ import annotations

from collections.abc import Callable

from lmtrain.interop.families.base import (
    Family,
    HFConfig,
    HFInteropError,
    TensorRule,
    bias_to_heads,
    head_rules,
    heads_to_linear,
    identity,
    linear_to_heads,
    require,
    tensor_rule,
    transpose,
    vocab_rows,
)
from lmtrain.model.layers import ModelConfig


def rope_from_hf(hf: HFConfig, family: str) -> tuple[float, tuple]:
    """RoPE theta and scaling from either the transformers>=5 `rope_parameters` or the older `rope_scaling`.

    With both present, transformers (5.x, RotaryEmbeddingConfigMixin.convert_rope_params_to_dict) takes a non-empty
    `rope_scaling` whole, in place of `rope_parameters`, and a rope_theta missing from it from the top-level
    `rope_theta` (default 10000): lmtrain reads the same dict, so its logits are transformers' logits.
    """
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf.get(key) or {}, dict):
            raise hf.bad(key, hf[key], "an object (or null)")
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    merged = HFConfig(dict(hf.get(where) or {}), f"{hf.source} ({where})", family)
    theta = merged.number("rope_theta", hf.number("rope_theta", 10000.0))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type == "default":
        return theta, ()
    if rope_type == "llama3":
        return theta, (
            "llama3",
            merged.number("factor"),
            merged.number("low_freq_factor"),
            merged.number("high_freq_factor"),
            merged.positive_int("original_max_position_embeddings"),
        )
    raise HFInteropError(
        f"{hf.source} ({family}): RoPE scaling type {rope_type!r} is not supported (read from '{where}'); "
        "lmtrain supports 'default' and 'llama3'."
    )


def rope_to_hf(cfg: ModelConfig) -> dict:
    """Both spellings: `rope_parameters` for transformers>=5, `rope_theta`/`rope_scaling` for older readers."""
    params: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        _, factor, low, high, original = cfg.rope_scaling
        params = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
    legacy = {k: v for k, v in params.items() if k != "rope_theta"} if cfg.rope_scaling else None
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": legacy}


def llama_like_config_to_lm(family: str, qkv_bias: bool) -> Callable[[dict], tuple[dict, list[str]]]:
    def convert(hf: dict) -> tuple[dict, list[str]]:
        require(hf, "hidden_act", ("silu",), family, "silu")
        require(hf, "attention_bias", (False,), family, False)
        require(hf, "mlp_bias", (False,), family, False)
        notes = []
        theta, scaling = rope_from_hf(hf, family)
        d, nh = hf.positive_int("hidden_size"), hf.positive_int("num_attention_heads")
        head_dim = hf.positive_int("head_dim", d // nh or 1)
        if head_dim * nh != d and not hf.get("head_dim"):
            raise HFInteropError(f"{hf.source}: hidden_size={d} is not divisible by num_attention_heads={nh}; set "
                                 "head_dim in config.json.")
        nkv = hf.positive_int("num_key_value_heads", nh)
        if nh % nkv:
            raise HFInteropError(f"{hf.source}: num_attention_heads={nh} is not divisible by "
                                 f"num_key_value_heads={nkv}; fix config.json.")
        max_seq_len = hf.positive_int("max_position_embeddings", 2048)
        window = hf.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise hf.bad("sliding_window", window, "a positive integer or null")
        uses_window = hf.flag("use_sliding_window", True) if family == "Qwen2" else True
        if uses_window and window and window < max_seq_len:
            notes.append(
                f"{family} sliding_window={window} is smaller than max_position_embeddings={max_seq_len}; lmtrain "
                f"attends over the full context, which equals sliding-window attention up to {window} tokens, so "
                f"model.max_seq_len is set to {window}."
            )
            max_seq_len = window
        fields = dict(
            vocab_size=hf.positive_int("vocab_size"),
            d_model=d,
            n_layers=hf.positive_int("num_hidden_layers"),
            n_heads=nh,
            n_kv_heads=nkv,
            head_dim=0 if head_dim * nh == d else head_dim,
            d_ff=hf.positive_int("intermediate_size"),
            max_seq_len=max_seq_len,
            pos_embedding="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            norm="rmsnorm",
            norm_eps=hf.number("rms_norm_eps", 1e-6),
            mlp="swiglu",
            use_bias=False,
            qkv_bias=qkv_bias,
            tie_embeddings=hf.flag("tie_word_embeddings", False),
        )
        return fields, notes

    return convert


def llama_like_config_to_hf(architecture: str, model_type: str) -> Callable[[ModelConfig], dict]:
    def convert(cfg: ModelConfig) -> dict:
        out = {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.resolved_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": 0.0,
            **rope_to_hf(cfg),
        }
        if model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:  # lmtrain attends over the full context: no sliding window
            out.update(sliding_window=None, use_sliding_window=False)
        return out

    return convert


def rules(cfg: ModelConfig) -> list[TensorRule]:
    d, nh, nkv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    f, V, Vp = cfg.d_ff, cfg.vocab_size, cfg.padded_vocab
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    out = [
        tensor_rule("model.embed_tokens.weight", "embed", (V, d), vocab_rows(V, Vp)),
        tensor_rule("model.layers.{i}.input_layernorm.weight", "blocks/attn_norm/scale", (d,), identity()),
        tensor_rule(a + "q_proj.weight", "blocks/attn/wq", (nh * hd, d), linear_to_heads(d, nh, hd)),
        tensor_rule(a + "k_proj.weight", "blocks/attn/wk", (nkv * hd, d), linear_to_heads(d, nkv, hd)),
        tensor_rule(a + "v_proj.weight", "blocks/attn/wv", (nkv * hd, d), linear_to_heads(d, nkv, hd)),
        tensor_rule(a + "o_proj.weight", "blocks/attn/wo", (d, nh * hd), heads_to_linear(d, nh, hd)),
        tensor_rule("model.layers.{i}.post_attention_layernorm.weight", "blocks/mlp_norm/scale", (d,), identity()),
        tensor_rule(m + "gate_proj.weight", "blocks/mlp/w_gate", (f, d), transpose()),
        tensor_rule(m + "up_proj.weight", "blocks/mlp/w_in", (f, d), transpose()),
        tensor_rule(m + "down_proj.weight", "blocks/mlp/w_out", (d, f), transpose()),
        tensor_rule("model.norm.weight", "final_norm/scale", (d,), identity()),
    ]
    if cfg.qkv_bias:
        out += [
            tensor_rule(a + "q_proj.bias", "blocks/attn/bq", (nh * hd,), bias_to_heads(nh, hd)),
            tensor_rule(a + "k_proj.bias", "blocks/attn/bk", (nkv * hd,), bias_to_heads(nkv, hd)),
            tensor_rule(a + "v_proj.bias", "blocks/attn/bv", (nkv * hd,), bias_to_heads(nkv, hd)),
        ]
    return out + head_rules(cfg)


def fits(cfg: ModelConfig) -> bool:
    return (cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.use_bias
            and not cfg.qkv_bias)


def qwen2_fits(cfg: ModelConfig) -> bool:
    return (cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.use_bias
            and cfg.qkv_bias)


LORA_MODULES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
                "up_proj": ("up",), "down_proj": ("down",)}


def _llama_like(name: str, prefix: str, qkv_bias: bool, **kwargs) -> Family:
    """`prefix` is the HF class prefix ('Llama'), also the family's name in messages."""
    return Family(
        name=name,
        architectures=(f"{prefix}ForCausalLM",),
        model_type=name,
        base_prefix="model.",
        config_to_lm=llama_like_config_to_lm(prefix, qkv_bias=qkv_bias),
        config_to_hf=llama_like_config_to_hf(f"{prefix}ForCausalLM", name),
        rules=rules,
        lora_modules=LORA_MODULES,
        ignored_suffixes=(".rotary_emb.inv_freq",),
        optional=("lm_head.weight",),
        classifier=f"{prefix}ForSequenceClassification",
        **kwargs,
    )


LLAMA = _llama_like("llama", "Llama", False, fits=fits, needs="Llama/Mistral (rope, rmsnorm, swiglu, no biases)")
MISTRAL = _llama_like("mistral", "Mistral", False, fits=fits, fallback=False)  # Llama exports such a model
QWEN2 = _llama_like("qwen2", "Qwen2", True, fits=qwen2_fits, needs="Qwen2 (as Llama with qkv_bias)")
FAMILIES = (LLAMA, MISTRAL, QWEN2)
