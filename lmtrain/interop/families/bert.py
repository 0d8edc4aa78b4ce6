"""BERT and RoBERTa: post-norm encoders with learned absolute positions, token types and an embedding LayerNorm,
with their heads (bare model/pooler, masked LM, sequence and token classification). RoBERTa differs in its
position numbering (from pad_token_id + 1) and where its heads keep their tensors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lmtrain.interop.families.base import (
    Family,
    HFConfig,
    HFInteropError,
    TensorRule,
    bias_to_heads,
    classifier_labels,
    contiguous,
    heads_to_linear,
    identity,
    linear_to_heads,
    require,
    tensor_rule,
    transpose,
    vocab_head,
    vocab_rows,
)
from lmtrain.model.layers import ModelConfig

NEEDS = ("BERT and RoBERTa need pos_embedding='learned', norm='layernorm', mlp='gelu_exact' (or 'gelu'), "
         "use_bias=True, n_kv_heads=n_heads, norm_position='post', embed_norm=True and type_vocab_size >= 1")
LORA_MODULES = {"query": ("q",), "key": ("k",), "value": ("v",), "attention.output.dense": ("o",),
                "intermediate.dense": ("up",), "output.dense": ("down",)}


# The HF class of each lmtrain encoder head. A bare BertModel/RobertaModel imports into the 'pool' head
# (its pooler), which returns the pooled first token.
_ENCODER_HEADS = {"pool": "Model", "mlm": "ForMaskedLM", "classify": "ForSequenceClassification",
                  "token_classify": "ForTokenClassification"}


def _encoder_config_to_lm(family: str, prefix: str) -> Callable[[dict], tuple[dict, list[str]]]:
    """BERT and RoBERTa: post-norm encoders with learned absolute positions, token types and an embedding
    LayerNorm. RoBERTa numbers positions from pad_token_id + 1; lmtrain keeps only the rows real tokens use."""

    def convert(hf: dict) -> tuple[dict, list[str]]:
        require(hf, "hidden_act", ("gelu", "gelu_new", "gelu_pytorch_tanh"), family, "gelu")
        require(hf, "position_embedding_type", ("absolute", None), family, "absolute")
        require(hf, "is_decoder", (False,), family, False)
        require(hf, "add_cross_attention", (False,), family, False)
        d, nh = hf.positive_int("hidden_size"), hf.positive_int("num_attention_heads")
        if d % nh:
            raise HFInteropError(f"{hf.source}: hidden_size={d} is not divisible by num_attention_heads={nh}; fix "
                                 "config.json.")
        positions = hf.positive_int("max_position_embeddings", 512)
        notes = []
        if family == "RoBERTa":
            offset = _roberta_offset(hf)
            if positions <= offset:
                raise hf.bad("max_position_embeddings", positions, f"larger than pad_token_id + 1 = {offset}")
            notes.append(f"RoBERTa numbers positions from pad_token_id + 1 = {offset}; lmtrain keeps the "
                         f"{positions - offset} rows that real tokens use (model.max_seq_len), position 0 = row {offset}.")
            positions -= offset
        names = hf.get("architectures") or []
        head = next((h for h, suffix in _ENCODER_HEADS.items() if prefix + suffix in names), "pool")
        fields = dict(
            vocab_size=hf.positive_int("vocab_size"),
            d_model=d,
            n_layers=hf.positive_int("num_hidden_layers"),
            n_heads=nh,
            n_kv_heads=nh,
            head_dim=0,
            d_ff=hf.positive_int("intermediate_size"),
            max_seq_len=positions,
            pos_embedding="learned",
            norm="layernorm",
            norm_eps=hf.number("layer_norm_eps", 1e-12),
            mlp="gelu_exact" if hf.get("hidden_act", "gelu") == "gelu" else "gelu",
            use_bias=True,
            qkv_bias=False,
            tie_embeddings=hf.flag("tie_word_embeddings", True),
            rope_scaling=(),
            causal=False,
            type_vocab_size=hf.positive_int("type_vocab_size", 2),
            norm_position="post",
            embed_norm=True,
            pooling="cls",
            head=head,
        )
        if head in ("classify", "token_classify"):
            fields["num_labels"] = len(classifier_labels(hf))
        fields.update(_encoder_dropout(hf))
        return fields, notes

    return convert


def _dropout_rate(hf: HFConfig, key: str, default: float) -> float:
    rate = hf.number(key, default)
    if rate >= 1:
        raise hf.bad(key, rate, "a dropout rate in [0, 1)")
    return rate


def _encoder_dropout(hf: HFConfig) -> dict:
    """The model's own training dropout (transformers' defaults when config.json omits it): hidden_dropout_prob on
    the embeddings and each sublayer's output, attention_probs_dropout_prob on the attention probabilities, and
    classifier_dropout (None: the hidden dropout, as BertForSequenceClassification) on a classifier's input."""
    hidden = _dropout_rate(hf, "hidden_dropout_prob", 0.1)
    return {"dropout": hidden, "attention_dropout": _dropout_rate(hf, "attention_probs_dropout_prob", 0.1),
            "classifier_dropout": _dropout_rate(hf, "classifier_dropout", hidden)}


def _roberta_offset(hf: dict) -> int:
    pad = hf.get("pad_token_id", 1)
    return (1 if pad is None else int(pad)) + 1


def _encoder_config_to_hf(prefix: str, model_type: str) -> Callable[[ModelConfig], dict]:
    def convert(cfg: ModelConfig) -> dict:
        offset = 2 if model_type == "roberta" else 0  # RoBERTa: pad_token_id 1, positions from row 2
        out = {
            "architectures": [prefix + _ENCODER_HEADS.get(cfg.head, "Model")],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.d_ff,
            "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
            "max_position_embeddings": cfg.max_seq_len + offset,
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": cfg.tie_embeddings,
            "is_decoder": False,
            # transformers' training defaults for these models; inference never applies dropout
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
        }
        if model_type == "roberta":
            out["pad_token_id"] = 1
        return out

    return convert


def _encoder_rules(prefix: str, roberta: bool) -> Callable[[ModelConfig], list[TensorRule]]:
    """BertModel's (or RobertaModel's) tensors plus those of the head: `prefix` is the base model's name in
    the checkpoint ('bert.', 'roberta.'); a bare base model ('pool' head) is written without it."""

    def rules(cfg: ModelConfig) -> list[TensorRule]:
        d, nh, hd, f, V, Vp = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size, cfg.padded_vocab
        base = "" if cfg.head == "pool" else prefix
        e, a, layer = base + "embeddings.", base + "encoder.layer.{i}.attention.", base + "encoder.layer.{i}."
        offset = 2 if roberta else 0
        out = [
            tensor_rule(e + "word_embeddings.weight", "embed", (V, d), vocab_rows(V, Vp)),
            tensor_rule(e + "position_embeddings.weight", "pos_embed", (cfg.max_seq_len + offset, d), _skip_rows(offset)),
            tensor_rule(e + "token_type_embeddings.weight", "type_embed", (cfg.type_vocab_size, d), identity()),
            tensor_rule(e + "LayerNorm.weight", "embed_norm/scale", (d,), identity()),
            tensor_rule(e + "LayerNorm.bias", "embed_norm/bias", (d,), identity()),
        ]
        for name, path in (("query", "q"), ("key", "k"), ("value", "v")):
            out += [
                tensor_rule(a + f"self.{name}.weight", f"blocks/attn/w{path}", (nh * hd, d), linear_to_heads(d, nh, hd)),
                tensor_rule(a + f"self.{name}.bias", f"blocks/attn/b{path}", (nh * hd,), bias_to_heads(nh, hd)),
            ]
        out += [
            tensor_rule(a + "output.dense.weight", "blocks/attn/wo", (d, nh * hd), heads_to_linear(d, nh, hd)),
            tensor_rule(a + "output.dense.bias", "blocks/attn/bo", (d,), identity()),
            tensor_rule(a + "output.LayerNorm.weight", "blocks/attn_norm/scale", (d,), identity()),
            tensor_rule(a + "output.LayerNorm.bias", "blocks/attn_norm/bias", (d,), identity()),
            tensor_rule(layer + "intermediate.dense.weight", "blocks/mlp/w_in", (f, d), transpose()),
            tensor_rule(layer + "intermediate.dense.bias", "blocks/mlp/b_in", (f,), identity()),
            tensor_rule(layer + "output.dense.weight", "blocks/mlp/w_out", (d, f), transpose()),
            tensor_rule(layer + "output.dense.bias", "blocks/mlp/b_out", (d,), identity()),
            tensor_rule(layer + "output.LayerNorm.weight", "blocks/mlp_norm/scale", (d,), identity()),
            tensor_rule(layer + "output.LayerNorm.bias", "blocks/mlp_norm/bias", (d,), identity()),
        ]
        return out + _encoder_head_rules(cfg, base, roberta)

    return rules


def _encoder_head_rules(cfg: ModelConfig, base: str, roberta: bool) -> list[TensorRule]:
    d, C, V, Vp = cfg.d_model, cfg.num_labels, cfg.vocab_size, cfg.padded_vocab

    def pooler(dense: str) -> list[TensorRule]:
        return [tensor_rule(dense + ".weight", "head/pooler/w", (d, d), transpose()),
                tensor_rule(dense + ".bias", "head/pooler/b", (d,), identity())]

    if cfg.head == "pool":
        return pooler(base + "pooler.dense")
    if cfg.head == "classify":
        if cfg.pooling != "cls":
            raise HFInteropError("an encoder's classify head pools the first token (model.pooling='cls'), as "
                                 "*ForSequenceClassification encoders do; this model has model.pooling="
                                 f"'{cfg.pooling}'.")
        out_proj = "classifier.out_proj" if roberta else "classifier"  # RoBERTa's pooler lives in its classifier
        return pooler("classifier.dense" if roberta else base + "pooler.dense") + [
            tensor_rule(out_proj + ".weight", "head/score", (C, d), transpose()),
            tensor_rule(out_proj + ".bias", "head/bias", (C,), identity()),
        ]
    if cfg.head == "token_classify":
        return [tensor_rule("classifier.weight", "head/score", (C, d), transpose()),
                tensor_rule("classifier.bias", "head/bias", (C,), identity())]
    if cfg.head == "mlm":
        p, norm = ("lm_head.", "lm_head.layer_norm") if roberta else ("cls.predictions.", "cls.predictions.transform.LayerNorm")
        dense = "lm_head.dense" if roberta else "cls.predictions.transform.dense"
        out = [
            tensor_rule(dense + ".weight", "head/transform/w", (d, d), transpose()),
            tensor_rule(dense + ".bias", "head/transform/b", (d,), identity()),
            tensor_rule(norm + ".weight", "head/norm/scale", (d,), identity()),
            tensor_rule(norm + ".bias", "head/norm/bias", (d,), identity()),
        ]
        if cfg.tie_embeddings:
            return out + [tensor_rule(p + "bias", "head/bias", (V,), _vocab_bias(V, Vp))]
        # untied, transformers unties the decoder's bias from `bias` too, and reads only the decoder's
        return out + [tensor_rule(p + "decoder.weight", "head/w", (V, d), vocab_head(V, Vp)),
                      tensor_rule(p + "decoder.bias", "head/bias", (V,), _vocab_bias(V, Vp))]
    raise HFInteropError(f"model head '{cfg.head}' has no Hugging Face encoder counterpart; lmtrain exports "
                         f"{', '.join(_ENCODER_HEADS)}.")


def _skip_rows(offset: int) -> tuple[Callable, Callable]:
    """RoBERTa's position table <-> lmtrain's: the first `offset` rows (padding and below) are never read for a
    real token; they are dropped on import and written as zeros on export."""

    def to_hf(xs):
        return contiguous(np.concatenate([np.zeros((offset, xs[0].shape[1]), xs[0].dtype), xs[0]]))

    return (lambda w: (contiguous(w[offset:]),)), to_hf


def _vocab_bias(vocab: int, padded: int) -> tuple[Callable, Callable]:
    """The MLM head's per-token bias [vocab] <-> [padded_vocab] (padding entries zero, never predicted)."""

    def to_lm(b):
        out = np.zeros((padded,), b.dtype)
        out[:vocab] = b
        return (out,)

    return to_lm, (lambda xs: contiguous(xs[0][:vocab]))


def fits(cfg: ModelConfig) -> bool:
    """Whether BERT (and RoBERTa) reproduce this lmtrain model exactly."""
    return (not cfg.causal and cfg.pos_embedding == "learned" and cfg.norm == "layernorm"
            and cfg.mlp in ("gelu", "gelu_exact") and cfg.use_bias and not cfg.qkv_bias and cfg.n_kv_heads == cfg.n_heads
            and cfg.resolved_head_dim * cfg.n_heads == cfg.d_model and cfg.norm_position == "post" and cfg.embed_norm
            and cfg.type_vocab_size >= 1)


def _encoder_family(name: str, prefix: str, roberta: bool) -> Family:
    classes = {head: prefix + suffix for head, suffix in _ENCODER_HEADS.items()}
    base = prefix.lower() + "."
    mlm_tied = ("lm_head.decoder.weight", "lm_head.decoder.bias", "lm_head.bias") if roberta else (
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias")
    return Family(
        name=name,
        architectures=(classes["pool"], classes["mlm"], classes["token_classify"]),
        model_type=name,
        base_prefix=base,
        config_to_lm=_encoder_config_to_lm("RoBERTa" if roberta else "BERT", prefix),
        config_to_hf=_encoder_config_to_hf(prefix, name),
        rules=_encoder_rules(base, roberta),
        fits=fits,
        causal=False,
        fallback=not roberta,  # an encoder exports as BERT unless it was imported from RoBERTa
        needs="" if roberta else NEEDS,
        lora_modules=LORA_MODULES,
        ignored_suffixes=("embeddings.position_ids",),  # a buffer of older checkpoints
        # tied copies (of the embedding; an untied head's unused `bias`), and what pretraining checkpoints carry
        # besides a masked-LM head
        optional=(*mlm_tied, base + "pooler.dense.weight", base + "pooler.dense.bias", "cls.seq_relationship.weight",
                  "cls.seq_relationship.bias"),
        classifier=classes["classify"],
        heads=tuple(classes.items()),
    )


BERT = _encoder_family("bert", "Bert", roberta=False)
ROBERTA = _encoder_family("roberta", "Roberta", roberta=True)
FAMILIES = (BERT, ROBERTA)
