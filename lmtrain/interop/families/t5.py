"""T5 (T5ForConditionalGeneration): T5 v1.0 (ReLU feed-forward, tied embeddings, decoder output scaled by
d_model**-0.5) and T5 v1.1 / Flan-T5 (gated-GELU, untied head, no scaling), into lmtrain's encoder-decoder
(lmtrain.model.encdec) and back.

Two stacks, so a block rule's lmtrain path is 'encoder/blocks/...' or 'decoder/blocks/...' and `{i}` runs over
that stack's layers (`T5TensorRule`). Each stack's relative-position table lives in its block 0 in transformers
and once per stack in lmtrain.

Tying: transformers >= 5 always writes `tie_word_embeddings: true` for T5 and keeps the scaling in its own
`scale_decoder_outputs` field; it unties the head when the checkpoint holds an `lm_head.weight` that differs from
`shared.weight`. `config_from_hf` reads the same way: the config for the scaling, the tensors for the tying.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lmtrain.interop.families.base import (
    Family,
    HFConfig,
    HFInteropError,
    TensorRule,
    heads_to_linear,
    identity,
    linear_to_heads,
    require,
    transpose,
    vocab_head,
    vocab_rows,
)
from lmtrain.model.encdec.config import MLPS, T5_LORA_NAMES, T5Config

ARCHITECTURE = "T5ForConditionalGeneration"
# A relative-position table some checkpoints carry for the decoder's cross-attention; transformers never reads it.
IGNORED_SUFFIXES = ("EncDecAttention.relative_attention_bias.weight",)
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class T5TensorRule(TensorRule):
    """A TensorRule whose block parameters live under 'encoder/blocks/' or 'decoder/blocks/'."""

    @property
    def per_layer(self) -> bool:
        return "/blocks/" in self.lm[0] or self.lm[0].startswith("blocks/")

    def n_layers(self, cfg: T5Config) -> int:
        return cfg.decoder_layers if self.lm[0].startswith("decoder/") else cfg.n_layers


def _rule(hf: str, lm: str | tuple[str, ...], hf_shape: tuple[int, ...], conv) -> T5TensorRule:
    return T5TensorRule(hf, (lm,) if isinstance(lm, str) else lm, tuple(hf_shape), conv[0], conv[1])


# ---------------------------------------------------------------------------------------------- config


def config_to_lm(hf: dict) -> tuple[dict, list[str]]:
    """config.json -> T5Config fields. The head's tying is config.json's guess; `config_from_hf` settles it from
    the tensors."""
    hf = hf if isinstance(hf, HFConfig) else HFConfig(hf, family="T5")
    require(hf, "feed_forward_proj", MLPS, "T5", "relu")
    require(hf, "is_decoder", (False,), "T5", False)
    require(hf, "is_encoder_decoder", (True,), "T5", True)
    tied = hf.flag("tie_word_embeddings", True)
    scaled = hf.flag("scale_decoder_outputs", tied)  # older configs: tying and scaling were one switch
    n_layers = hf.positive_int("num_layers")
    dropout = hf.number("dropout_rate", 0.1)
    if dropout >= 1:
        raise hf.bad("dropout_rate", dropout, "a dropout rate in [0, 1)")
    pad = _token_id(hf, "pad_token_id", 0)
    fields = dict(
        vocab_size=hf.positive_int("vocab_size"),
        d_model=hf.positive_int("d_model"),
        n_layers=n_layers,
        n_decoder_layers=hf.positive_int("num_decoder_layers", n_layers),
        n_heads=hf.positive_int("num_heads"),
        head_dim=hf.positive_int("d_kv"),
        d_ff=hf.positive_int("d_ff"),
        mlp=hf.get("feed_forward_proj", "relu"),
        relative_buckets=hf.positive_int("relative_attention_num_buckets", 32),
        relative_max_distance=hf.positive_int("relative_attention_max_distance", 128),
        norm_eps=hf.number("layer_norm_epsilon", 1e-6),
        tie_embeddings=tied,
        scale_decoder_outputs=scaled,
        dropout=dropout,
        pad_id=pad,
        eos_id=_token_id(hf, "eos_token_id", 1),
        decoder_start_id=_token_id(hf, "decoder_start_token_id", pad),
    )
    notes = []
    if tied != scaled:
        notes.append(f"T5 with tie_word_embeddings={tied} and scale_decoder_outputs={scaled}: transformers >= 5 "
                     "reads both; older versions scale exactly when the head is tied.")
    return fields, notes


def _token_id(hf: HFConfig, key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, list) and value:  # several EOS ids: lmtrain's T5Config keeps the first
        value = value[0]
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise hf.bad(key, value, "a token id (a non-negative integer)")
    return value


def config_from_hf(hf: dict, tensors: dict[str, np.ndarray] | None = None) -> tuple[T5Config, list[str]]:
    """The T5Config of a checkpoint: config.json's fields, with the head untied when the tensors hold an
    `lm_head.weight` that is not `shared.weight` (as transformers decides)."""
    fields, notes = config_to_lm(hf)
    if tensors is not None:
        fields["tie_embeddings"] = checkpoint_ties_head(tensors)
    return T5Config(**fields), notes


def checkpoint_ties_head(tensors: dict[str, np.ndarray]) -> bool:
    return _ties_head(tensors.get)


def _ties_head(read) -> bool:
    """Whether the head is the shared embedding: no `lm_head.weight`, or one equal to `shared.weight`."""
    head = read("lm_head.weight")
    if head is None:
        return True
    shared = read("shared.weight")
    return shared is not None and np.array_equal(np.asarray(head), np.asarray(shared))


def settle_config(fields: dict, read) -> dict:
    """`lmtrain import`: the tying from the tensors, as transformers decides it (`read(name)`: a tensor or None)."""
    return {**fields, "tie_embeddings": _ties_head(read)}


def config_to_hf(cfg: T5Config) -> dict:
    """T5Config -> config.json, readable by transformers 4 (one tie/scale switch) and 5 (two fields)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "feed_forward_proj": cfg.mlp,
        "layer_norm_epsilon": cfg.norm_eps,
        "dropout_rate": cfg.dropout,
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": cfg.eos_id,
        "decoder_start_token_id": cfg.decoder_start_id,
        "use_cache": True,
    }


# ---------------------------------------------------------------------------------------------- tensors


def _attention_rules(hf: str, lm: str, cfg: T5Config) -> list[T5TensorRule]:
    d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
    out = [_rule(f"{hf}.{p}.weight", f"{lm}/w{p}", (n * h, d), linear_to_heads(d, n, h)) for p in ("q", "k", "v")]
    return out + [_rule(f"{hf}.o.weight", f"{lm}/wo", (d, n * h), heads_to_linear(d, n, h))]


def _mlp_rules(hf: str, lm: str, cfg: T5Config) -> list[T5TensorRule]:
    d, f = cfg.d_model, cfg.d_ff
    if cfg.mlp == "gated-gelu":  # transformers: gelu(wi_0 x) * wi_1 x
        ins = [_rule(f"{hf}.wi_0.weight", f"{lm}/w_gate", (f, d), transpose()),
               _rule(f"{hf}.wi_1.weight", f"{lm}/w_in", (f, d), transpose())]
    else:
        ins = [_rule(f"{hf}.wi.weight", f"{lm}/w_in", (f, d), transpose())]
    return ins + [_rule(f"{hf}.wo.weight", f"{lm}/w_out", (d, f), transpose())]


def _stack_rules(stack: str, cfg: T5Config) -> list[T5TensorRule]:
    d, decoder = cfg.d_model, stack == "decoder"
    block, lm = f"{stack}.block.{{i}}.layer.", f"{stack}/blocks"
    ff = 2 if decoder else 1
    out = [
        _rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}/rel_bias",
              (cfg.relative_buckets, cfg.n_heads), identity()),
        _rule(block + "0.layer_norm.weight", f"{lm}/attn_norm/scale", (d,), identity()),
        *_attention_rules(block + "0.SelfAttention", f"{lm}/attn", cfg),
    ]
    if decoder:
        out += [_rule(block + "1.layer_norm.weight", f"{lm}/cross_norm/scale", (d,), identity()),
                *_attention_rules(block + "1.EncDecAttention", f"{lm}/cross", cfg)]
    out += [_rule(block + f"{ff}.layer_norm.weight", f"{lm}/mlp_norm/scale", (d,), identity()),
            *_mlp_rules(block + f"{ff}.DenseReluDense", f"{lm}/mlp", cfg),
            _rule(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale", (d,), identity())]
    return out


def rules(cfg: T5Config) -> list[T5TensorRule]:
    V, Vp, d = cfg.vocab_size, cfg.padded_vocab, cfg.d_model
    out = [_rule("shared.weight", "embed", (V, d), vocab_rows(V, Vp)), *_stack_rules("encoder", cfg),
           *_stack_rules("decoder", cfg)]
    if not cfg.tie_embeddings:
        out.append(_rule("lm_head.weight", "head", (V, d), vocab_head(V, Vp)))
    return out


def _get(params: dict, path: str):
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _set(params: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        params = params.setdefault(key, {})
    params[leaf] = value


def params_from_hf(tensors: dict[str, np.ndarray], cfg: T5Config, source: str = "checkpoint") -> dict:
    """lmtrain parameters (a nested dict of numpy arrays, blocks stacked per stack) from a T5 state dict. A missing
    tensor, one of the wrong shape, or one that no rule reads is an HFInteropError naming it."""
    table = rules(cfg)
    wanted = {rule.hf_name(i) for rule in table for i in (range(rule.n_layers(cfg)) if rule.per_layer else [None])}
    optional = set(TIED_COPIES) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(n for n in set(tensors) - wanted - optional if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise HFInteropError(f"{source}: tensors {', '.join(extra[:5])} are not part of a {cfg.mlp} T5 with "
                             f"{cfg.n_layers}+{cfg.decoder_layers} layers; check config.json against the weights.")
    params: dict = {}
    for rule in table:
        layers = range(rule.n_layers(cfg)) if rule.per_layer else [None]
        per_layer = [rule.to_lm(_read(tensors, rule, layer, source)) for layer in layers]
        for j, path in enumerate(rule.lm):
            parts = [converted[j] for converted in per_layer]
            _set(params, path, np.stack(parts) if rule.per_layer else parts[0])
    return params


def _read(tensors: dict, rule: T5TensorRule, layer: int | None, source: str) -> np.ndarray:
    name = rule.hf_name(layer)
    if name not in tensors:
        raise HFInteropError(f"{source}: tensor '{name}' is missing; a T5ForConditionalGeneration checkpoint "
                             "with this config.json has it.")
    value = np.asarray(tensors[name])
    if tuple(value.shape) != rule.hf_shape:
        raise HFInteropError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, config.json implies "
                             f"{rule.hf_shape}; check config.json against the weights.")
    return value


def params_to_hf(params: dict, cfg: T5Config) -> dict[str, np.ndarray]:
    """The transformers state dict of lmtrain T5 parameters (merge LoRA adapters first)."""
    out = {}
    for rule in rules(cfg):
        values = [np.asarray(_get(params, path)) for path in rule.lm]
        for layer in range(rule.n_layers(cfg)) if rule.per_layer else [None]:
            out[rule.hf_name(layer)] = rule.to_hf(tuple(v if layer is None else v[layer] for v in values))
    return out


def fits(cfg) -> bool:
    """Whether this family reproduces a model exactly: every lmtrain encoder-decoder is a T5."""
    return isinstance(cfg, T5Config)


T5 = Family(
    name="t5",
    architectures=(ARCHITECTURE,),
    model_type="t5",
    base_prefix="",
    config_to_lm=config_to_lm,
    config_to_hf=config_to_hf,
    rules=rules,
    fits=fits,
    causal=False,
    fallback=False,
    needs="T5 (an lmtrain encoder-decoder, model.mlp relu or gated-gelu)",
    lora_modules=dict(T5_LORA_NAMES),
    ignored_suffixes=IGNORED_SUFFIXES,
    optional=(*TIED_COPIES, "lm_head.weight"),
    encoder_decoder=True,
    settle_config=settle_config,
)
FAMILIES = (T5,)
