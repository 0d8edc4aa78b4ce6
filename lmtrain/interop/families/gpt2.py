"""GPT-2 (GPT2LMHeadModel, GPT2ForSequenceClassification): learned positions, LayerNorm, tanh-GELU, biases, and
Conv1D projections that store [in, out], lmtrain's own orientation."""

from __future__ import annotations

import numpy as np

from lmtrain.interop.families.base import (
    Family,
    HFInteropError,
    TensorRule,
    contiguous,
    head_rules,
    identity,
    require,
    tensor_rule,
    vocab_rows,
)
from lmtrain.model.layers import ModelConfig


def config_to_lm(hf: dict) -> tuple[dict, list[str]]:
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "GPT-2", "gelu_new")
    require(hf, "scale_attn_weights", (True,), "GPT-2", True)
    require(hf, "scale_attn_by_inverse_layer_idx", (False,), "GPT-2", False)
    require(hf, "add_cross_attention", (False,), "GPT-2", False)
    d, nh = hf.positive_int("n_embd"), hf.positive_int("n_head")
    if d % nh:
        raise HFInteropError(f"{hf.source}: n_embd={d} is not divisible by n_head={nh}; fix config.json.")
    fields = dict(
        vocab_size=hf.positive_int("vocab_size"),
        d_model=d,
        n_layers=hf.positive_int("n_layer"),
        n_heads=nh,
        n_kv_heads=nh,
        head_dim=0,
        d_ff=hf.positive_int("n_inner", 4 * d),
        max_seq_len=hf.positive_int("n_positions"),
        pos_embedding="learned",
        norm="layernorm",
        norm_eps=hf.number("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        use_bias=True,
        qkv_bias=False,
        tie_embeddings=hf.flag("tie_word_embeddings", True),
        rope_scaling=(),
    )
    return fields, []


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": "gelu_new",
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def rules(cfg: ModelConfig) -> list[TensorRule]:
    d, nh, hd, f, V, Vp = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size, cfg.padded_vocab

    def split_qkv_weight(w):  # Conv1D [d, 3*d] (in, out)
        return tuple(contiguous(part.reshape(d, nh, hd)) for part in np.split(w, 3, axis=1))

    def split_qkv_bias(b):
        return tuple(contiguous(part.reshape(nh, hd)) for part in np.split(b, 3))

    h = "transformer.h.{i}."
    out = [
        tensor_rule("transformer.wte.weight", "embed", (V, d), vocab_rows(V, Vp)),
        tensor_rule("transformer.wpe.weight", "pos_embed", (cfg.max_seq_len, d), identity()),
        tensor_rule(h + "ln_1.weight", "blocks/attn_norm/scale", (d,), identity()),
        tensor_rule(h + "ln_1.bias", "blocks/attn_norm/bias", (d,), identity()),
        tensor_rule(
            h + "attn.c_attn.weight",
            ("blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv"),
            (d, 3 * nh * hd),
            (split_qkv_weight, lambda xs: contiguous(np.concatenate([x.reshape(d, nh * hd) for x in xs], axis=1))),
        ),
        tensor_rule(
            h + "attn.c_attn.bias",
            ("blocks/attn/bq", "blocks/attn/bk", "blocks/attn/bv"),
            (3 * nh * hd,),
            (split_qkv_bias, lambda xs: contiguous(np.concatenate([x.reshape(nh * hd) for x in xs]))),
        ),
        # Conv1D stores [in, out], which is already lmtrain's orientation.
        tensor_rule(
            h + "attn.c_proj.weight",
            "blocks/attn/wo",
            (nh * hd, d),
            (lambda w: (contiguous(w.reshape(nh, hd, d)),), lambda xs: contiguous(xs[0].reshape(nh * hd, d))),
        ),
        tensor_rule(h + "attn.c_proj.bias", "blocks/attn/bo", (d,), identity()),
        tensor_rule(h + "ln_2.weight", "blocks/mlp_norm/scale", (d,), identity()),
        tensor_rule(h + "ln_2.bias", "blocks/mlp_norm/bias", (d,), identity()),
        tensor_rule(h + "mlp.c_fc.weight", "blocks/mlp/w_in", (d, f), identity()),
        tensor_rule(h + "mlp.c_fc.bias", "blocks/mlp/b_in", (f,), identity()),
        tensor_rule(h + "mlp.c_proj.weight", "blocks/mlp/w_out", (f, d), identity()),
        tensor_rule(h + "mlp.c_proj.bias", "blocks/mlp/b_out", (d,), identity()),
        tensor_rule("transformer.ln_f.weight", "final_norm/scale", (d,), identity()),
        tensor_rule("transformer.ln_f.bias", "final_norm/bias", (d,), identity()),
    ]
    return out + head_rules(cfg)


def fits(cfg: ModelConfig) -> bool:
    return (cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.use_bias
            and not cfg.qkv_bias and cfg.n_kv_heads == cfg.n_heads and cfg.resolved_head_dim * cfg.n_heads == cfg.d_model)


GPT2 = Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    model_type="gpt2",
    base_prefix="transformer.",
    config_to_lm=config_to_lm,
    config_to_hf=config_to_hf,
    rules=rules,
    fits=fits,
    needs="GPT-2 (learned, layernorm, gelu, use_bias)",
    lora_modules={"c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "c_fc": ("up",), "mlp.c_proj": ("down",)},
    ignored_suffixes=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of old GPT-2 checkpoints
    optional=("lm_head.weight",),
    classifier="GPT2ForSequenceClassification",
)
FAMILIES = (GPT2,)
