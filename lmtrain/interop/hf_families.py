"""How each Hugging Face model family maps onto lmtrain's parameters, in both directions.

A family is a config translation (HF `config.json` <-> lmtrain `model.*` fields) and a list of
`TensorRule`s. A rule ties one HF tensor to one or more lmtrain parameters (GPT-2's fused `c_attn`
feeds wq, wk and wv) and carries the two conversions. Block parameters are stacked on a leading
layers axis in lmtrain, so a rule whose parameters live under `blocks/` applies once per layer,
with `{i}` in the HF name standing for the layer index. Import and export both read this table;
nothing else in lmtrain knows an HF tensor name.

Every family is exact: a config that the lmtrain transformer cannot reproduce (another activation,
biases where lmtrain has none, another RoPE scaling) is refused with the setting named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lmtrain.model.layers import ModelConfig


class HFInteropError(ValueError):
    """An input that cannot be converted exactly. The message names the file, tensor or setting and what to do."""


class HFConfig(dict):
    """A config.json's fields. A missing field, or one of the wrong type, is an HFInteropError that names the field
    and the file, where a plain dict would give a KeyError (or a wrong model) deep inside the conversion."""

    def __init__(self, values: dict, source: str = "config.json", family: str = "this"):
        super().__init__(values)
        self.source, self.family = source, family

    def __missing__(self, key: str):
        raise HFInteropError(
            f"{self.source}: field '{key}' is missing; a {self.family} config.json needs it. Add it (the model's "
            "original config.json has it) and import again."
        )

    def _bad(self, key: str, value, want: str) -> HFInteropError:
        return HFInteropError(f"{self.source}: field '{key}' is {value!r}; it must be {want}. Fix config.json.")

    def positive_int(self, key: str, default: int | None = None) -> int:
        """A positive integer; without a default the field is required, with one a missing or null field takes it."""
        value = self[key] if default is None else self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._bad(key, value, "a positive integer")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        """A non-negative number; required without a default."""
        value = self[key] if default is None else self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self._bad(key, value, "a non-negative number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more lmtrain parameters ('blocks/attn/wq' style paths)."""

    hf: str  # HF tensor name; '{i}' is the layer index for block parameters
    lm: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_lm: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return self.lm[0].startswith("blocks/")

    def hf_name(self, layer: int | None) -> str:
        return self.hf.format(i=layer) if self.per_layer else self.hf


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # HF class names in config.json 'architectures'
    model_type: str
    base_prefix: str  # prefix of the base model's tensors; checkpoints of the bare base model omit it
    config_to_lm: Callable[[dict], tuple[dict, list[str]]]  # HF config -> (lmtrain model fields, notes)
    config_to_hf: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list[TensorRule]]
    ignored_suffixes: tuple[str, ...] = ()  # non-parameter buffers some checkpoints carry (causal masks, inv_freq)
    optional: tuple[str, ...] = ()  # tensors that may be present and are not used (lm_head copy of tied embeddings)
    classifier: str = ""  # the HF *ForSequenceClassification class: lmtrain's 'classify' head
    heads: tuple[tuple[str, str], ...] = ()  # encoders: (lmtrain head, HF class), e.g. ('mlm', 'BertForMaskedLM')

    def architecture(self, cfg: ModelConfig) -> str:
        """The HF class that holds an lmtrain model with `cfg.head`."""
        for head, architecture in self.heads:
            if head == cfg.head:
                return architecture
        return self.classifier if cfg.head == "classify" else self.architectures[0]

    def is_classifier(self, hf: dict) -> bool:
        return self.classifier in (hf.get("architectures") or [])

    def is_token_classifier(self, hf: dict) -> bool:
        return dict(self.heads).get("token_classify") in (hf.get("architectures") or [])


# ---------------------------------------------------------------------------------------------- conversions


def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def _identity() -> tuple[Callable, Callable]:
    return (lambda w: (_c(w),)), (lambda xs: _c(xs[0]))


def _transpose() -> tuple[Callable, Callable]:
    """torch Linear weight [out, in] <-> lmtrain [in, out]."""
    return (lambda w: (_c(w.T),)), (lambda xs: _c(xs[0].T))


def _linear_to_heads(d: int, n: int, h: int) -> tuple[Callable, Callable]:
    """torch Linear [n*h, d] (q/k/v projection) <-> lmtrain [d, n, h]."""
    return (lambda w: (_c(w.T.reshape(d, n, h)),)), (lambda xs: _c(xs[0].reshape(d, n * h).T))


def _heads_to_linear(d: int, n: int, h: int) -> tuple[Callable, Callable]:
    """torch Linear [d, n*h] (output projection) <-> lmtrain [n, h, d]."""
    return (lambda w: (_c(w.T.reshape(n, h, d)),)), (lambda xs: _c(xs[0].reshape(n * h, d).T))


def _bias_to_heads(n: int, h: int) -> tuple[Callable, Callable]:
    return (lambda b: (_c(b.reshape(n, h)),)), (lambda xs: _c(xs[0].reshape(n * h)))


def _vocab_rows(vocab: int, padded: int) -> tuple[Callable, Callable]:
    """[vocab, d] <-> [padded_vocab, d]: padding rows are zero on import and dropped on export."""

    def to_lm(w):
        out = np.zeros((padded, w.shape[1]), w.dtype)
        out[:vocab] = w
        return (out,)

    return to_lm, (lambda xs: _c(xs[0][:vocab]))


def _vocab_head(vocab: int, padded: int) -> tuple[Callable, Callable]:
    """torch lm_head [vocab, d] <-> lmtrain [d, padded_vocab]."""

    def to_lm(w):
        out = np.zeros((w.shape[1], padded), w.dtype)
        out[:, :vocab] = w.T
        return (out,)

    return to_lm, (lambda xs: _c(xs[0][:, :vocab].T))


def _rule(hf: str, lm: str | tuple[str, ...], hf_shape: tuple[int, ...], conv: tuple[Callable, Callable]) -> TensorRule:
    lm = (lm,) if isinstance(lm, str) else lm
    return TensorRule(hf, lm, tuple(hf_shape), conv[0], conv[1])


# ---------------------------------------------------------------------------------------------- config helpers


def _require(hf: HFConfig, key: str, allowed, family: str, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFInteropError(
            f"{hf.source} ({family}): {key}={value!r} is not supported (lmtrain reproduces {key} in "
            f"{sorted(map(repr, allowed))} exactly). Convert or fine-tune a model with a supported setting."
        )


def _rope_from_hf(hf: HFConfig, family: str) -> tuple[float, tuple]:
    """RoPE theta and scaling from either the transformers>=5 `rope_parameters` or the older `rope_scaling`."""
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf.get(key) or {}, dict):
            raise hf._bad(key, hf[key], "an object (or null)")
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    merged = HFConfig({**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})},
                      f"{hf.source} ({where})", family)
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
        f"{hf.source} ({family}): RoPE scaling type {rope_type!r} is not supported; lmtrain supports 'default' and "
        "'llama3'."
    )


def _rope_to_hf(cfg: ModelConfig) -> dict:
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


# ---------------------------------------------------------------------------------------------- GPT-2


def _gpt2_config_to_lm(hf: dict) -> tuple[dict, list[str]]:
    _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "GPT-2", "gelu_new")
    _require(hf, "scale_attn_weights", (True,), "GPT-2", True)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "GPT-2", False)
    _require(hf, "add_cross_attention", (False,), "GPT-2", False)
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


def _gpt2_config_to_hf(cfg: ModelConfig) -> dict:
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


def _head_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The output head, the same in every family: a causal LM's lm_head (none when tied to the embedding), or a
    sequence classifier's bias-free `score` (HF [num_labels, d] <-> lmtrain head/score [d, num_labels])."""
    if cfg.head == "classify":
        return [_rule("score.weight", "head/score", (cfg.num_labels, cfg.d_model), _transpose())]
    if cfg.head != "lm":
        raise HFInteropError(f"model head '{cfg.head}' has no Hugging Face counterpart; lmtrain exports 'lm' "
                             "(*ForCausalLM) and 'classify' (*ForSequenceClassification).")
    if cfg.tie_embeddings:
        return []
    return [_rule("lm_head.weight", "head/w", (cfg.vocab_size, cfg.d_model), _vocab_head(cfg.vocab_size,
                                                                                        cfg.padded_vocab))]


def _gpt2_rules(cfg: ModelConfig) -> list[TensorRule]:
    d, nh, hd, f, V, Vp = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size, cfg.padded_vocab

    def split_qkv_weight(w):  # Conv1D [d, 3*d] (in, out)
        return tuple(_c(part.reshape(d, nh, hd)) for part in np.split(w, 3, axis=1))

    def split_qkv_bias(b):
        return tuple(_c(part.reshape(nh, hd)) for part in np.split(b, 3))

    h = "transformer.h.{i}."
    rules = [
        _rule("transformer.wte.weight", "embed", (V, d), _vocab_rows(V, Vp)),
        _rule("transformer.wpe.weight", "pos_embed", (cfg.max_seq_len, d), _identity()),
        _rule(h + "ln_1.weight", "blocks/attn_norm/scale", (d,), _identity()),
        _rule(h + "ln_1.bias", "blocks/attn_norm/bias", (d,), _identity()),
        _rule(
            h + "attn.c_attn.weight",
            ("blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv"),
            (d, 3 * nh * hd),
            (split_qkv_weight, lambda xs: _c(np.concatenate([x.reshape(d, nh * hd) for x in xs], axis=1))),
        ),
        _rule(
            h + "attn.c_attn.bias",
            ("blocks/attn/bq", "blocks/attn/bk", "blocks/attn/bv"),
            (3 * nh * hd,),
            (split_qkv_bias, lambda xs: _c(np.concatenate([x.reshape(nh * hd) for x in xs]))),
        ),
        # Conv1D stores [in, out], which is already lmtrain's orientation.
        _rule(
            h + "attn.c_proj.weight",
            "blocks/attn/wo",
            (nh * hd, d),
            (lambda w: (_c(w.reshape(nh, hd, d)),), lambda xs: _c(xs[0].reshape(nh * hd, d))),
        ),
        _rule(h + "attn.c_proj.bias", "blocks/attn/bo", (d,), _identity()),
        _rule(h + "ln_2.weight", "blocks/mlp_norm/scale", (d,), _identity()),
        _rule(h + "ln_2.bias", "blocks/mlp_norm/bias", (d,), _identity()),
        _rule(h + "mlp.c_fc.weight", "blocks/mlp/w_in", (d, f), _identity()),
        _rule(h + "mlp.c_fc.bias", "blocks/mlp/b_in", (f,), _identity()),
        _rule(h + "mlp.c_proj.weight", "blocks/mlp/w_out", (f, d), _identity()),
        _rule(h + "mlp.c_proj.bias", "blocks/mlp/b_out", (d,), _identity()),
        _rule("transformer.ln_f.weight", "final_norm/scale", (d,), _identity()),
        _rule("transformer.ln_f.bias", "final_norm/bias", (d,), _identity()),
    ]
    return rules + _head_rules(cfg)


# ---------------------------------------------------------------------------------------------- Llama, Mistral, Qwen2


def _llama_like_config_to_lm(family: str, qkv_bias: bool) -> Callable[[dict], tuple[dict, list[str]]]:
    def convert(hf: dict) -> tuple[dict, list[str]]:
        _require(hf, "hidden_act", ("silu",), family, "silu")
        _require(hf, "attention_bias", (False,), family, False)
        _require(hf, "mlp_bias", (False,), family, False)
        notes = []
        theta, scaling = _rope_from_hf(hf, family)
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
            raise hf._bad("sliding_window", window, "a positive integer or null")
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


def _llama_like_config_to_hf(architecture: str, model_type: str) -> Callable[[ModelConfig], dict]:
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
            **_rope_to_hf(cfg),
        }
        if model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:  # lmtrain attends over the full context: no sliding window
            out.update(sliding_window=None, use_sliding_window=False)
        return out

    return convert


def _llama_like_rules(cfg: ModelConfig) -> list[TensorRule]:
    d, nh, nkv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    f, V, Vp = cfg.d_ff, cfg.vocab_size, cfg.padded_vocab
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    rules = [
        _rule("model.embed_tokens.weight", "embed", (V, d), _vocab_rows(V, Vp)),
        _rule("model.layers.{i}.input_layernorm.weight", "blocks/attn_norm/scale", (d,), _identity()),
        _rule(a + "q_proj.weight", "blocks/attn/wq", (nh * hd, d), _linear_to_heads(d, nh, hd)),
        _rule(a + "k_proj.weight", "blocks/attn/wk", (nkv * hd, d), _linear_to_heads(d, nkv, hd)),
        _rule(a + "v_proj.weight", "blocks/attn/wv", (nkv * hd, d), _linear_to_heads(d, nkv, hd)),
        _rule(a + "o_proj.weight", "blocks/attn/wo", (d, nh * hd), _heads_to_linear(d, nh, hd)),
        _rule("model.layers.{i}.post_attention_layernorm.weight", "blocks/mlp_norm/scale", (d,), _identity()),
        _rule(m + "gate_proj.weight", "blocks/mlp/w_gate", (f, d), _transpose()),
        _rule(m + "up_proj.weight", "blocks/mlp/w_in", (f, d), _transpose()),
        _rule(m + "down_proj.weight", "blocks/mlp/w_out", (d, f), _transpose()),
        _rule("model.norm.weight", "final_norm/scale", (d,), _identity()),
    ]
    if cfg.qkv_bias:
        rules += [
            _rule(a + "q_proj.bias", "blocks/attn/bq", (nh * hd,), _bias_to_heads(nh, hd)),
            _rule(a + "k_proj.bias", "blocks/attn/bk", (nkv * hd,), _bias_to_heads(nkv, hd)),
            _rule(a + "v_proj.bias", "blocks/attn/bv", (nkv * hd,), _bias_to_heads(nkv, hd)),
        ]
    return rules + _head_rules(cfg)


# ---------------------------------------------------------------------------------------------- BERT, RoBERTa


# The HF class of each lmtrain encoder head. A bare BertModel/RobertaModel imports into the 'pool' head
# (its pooler), which returns the pooled first token.
_ENCODER_HEADS = {"pool": "Model", "mlm": "ForMaskedLM", "classify": "ForSequenceClassification",
                  "token_classify": "ForTokenClassification"}


def _encoder_config_to_lm(family: str, prefix: str) -> Callable[[dict], tuple[dict, list[str]]]:
    """BERT and RoBERTa: post-norm encoders with learned absolute positions, token types and an embedding
    LayerNorm. RoBERTa numbers positions from pad_token_id + 1; lmtrain keeps only the rows real tokens use."""

    def convert(hf: dict) -> tuple[dict, list[str]]:
        _require(hf, "hidden_act", ("gelu", "gelu_new", "gelu_pytorch_tanh"), family, "gelu")
        _require(hf, "position_embedding_type", ("absolute", None), family, "absolute")
        _require(hf, "is_decoder", (False,), family, False)
        _require(hf, "add_cross_attention", (False,), family, False)
        d, nh = hf.positive_int("hidden_size"), hf.positive_int("num_attention_heads")
        if d % nh:
            raise HFInteropError(f"{hf.source}: hidden_size={d} is not divisible by num_attention_heads={nh}; fix "
                                 "config.json.")
        positions = hf.positive_int("max_position_embeddings", 512)
        notes = []
        if family == "RoBERTa":
            offset = _roberta_offset(hf)
            if positions <= offset:
                raise hf._bad("max_position_embeddings", positions, f"larger than pad_token_id + 1 = {offset}")
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
        raise hf._bad(key, rate, "a dropout rate in [0, 1)")
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
            _rule(e + "word_embeddings.weight", "embed", (V, d), _vocab_rows(V, Vp)),
            _rule(e + "position_embeddings.weight", "pos_embed", (cfg.max_seq_len + offset, d), _skip_rows(offset)),
            _rule(e + "token_type_embeddings.weight", "type_embed", (cfg.type_vocab_size, d), _identity()),
            _rule(e + "LayerNorm.weight", "embed_norm/scale", (d,), _identity()),
            _rule(e + "LayerNorm.bias", "embed_norm/bias", (d,), _identity()),
        ]
        for name, path in (("query", "q"), ("key", "k"), ("value", "v")):
            out += [
                _rule(a + f"self.{name}.weight", f"blocks/attn/w{path}", (nh * hd, d), _linear_to_heads(d, nh, hd)),
                _rule(a + f"self.{name}.bias", f"blocks/attn/b{path}", (nh * hd,), _bias_to_heads(nh, hd)),
            ]
        out += [
            _rule(a + "output.dense.weight", "blocks/attn/wo", (d, nh * hd), _heads_to_linear(d, nh, hd)),
            _rule(a + "output.dense.bias", "blocks/attn/bo", (d,), _identity()),
            _rule(a + "output.LayerNorm.weight", "blocks/attn_norm/scale", (d,), _identity()),
            _rule(a + "output.LayerNorm.bias", "blocks/attn_norm/bias", (d,), _identity()),
            _rule(layer + "intermediate.dense.weight", "blocks/mlp/w_in", (f, d), _transpose()),
            _rule(layer + "intermediate.dense.bias", "blocks/mlp/b_in", (f,), _identity()),
            _rule(layer + "output.dense.weight", "blocks/mlp/w_out", (d, f), _transpose()),
            _rule(layer + "output.dense.bias", "blocks/mlp/b_out", (d,), _identity()),
            _rule(layer + "output.LayerNorm.weight", "blocks/mlp_norm/scale", (d,), _identity()),
            _rule(layer + "output.LayerNorm.bias", "blocks/mlp_norm/bias", (d,), _identity()),
        ]
        return out + _encoder_head_rules(cfg, base, roberta)

    return rules


def _encoder_head_rules(cfg: ModelConfig, base: str, roberta: bool) -> list[TensorRule]:
    d, C, V, Vp = cfg.d_model, cfg.num_labels, cfg.vocab_size, cfg.padded_vocab

    def pooler(dense: str) -> list[TensorRule]:
        return [_rule(dense + ".weight", "head/pooler/w", (d, d), _transpose()),
                _rule(dense + ".bias", "head/pooler/b", (d,), _identity())]

    if cfg.head == "pool":
        return pooler(base + "pooler.dense")
    if cfg.head == "classify":
        if cfg.pooling != "cls":
            raise HFInteropError("an encoder's classify head pools the first token (model.pooling='cls'), as "
                                 "*ForSequenceClassification encoders do; this model has model.pooling="
                                 f"'{cfg.pooling}'.")
        out_proj = "classifier.out_proj" if roberta else "classifier"  # RoBERTa's pooler lives in its classifier
        return pooler("classifier.dense" if roberta else base + "pooler.dense") + [
            _rule(out_proj + ".weight", "head/score", (C, d), _transpose()),
            _rule(out_proj + ".bias", "head/bias", (C,), _identity()),
        ]
    if cfg.head == "token_classify":
        return [_rule("classifier.weight", "head/score", (C, d), _transpose()),
                _rule("classifier.bias", "head/bias", (C,), _identity())]
    if cfg.head == "mlm":
        p, norm = ("lm_head.", "lm_head.layer_norm") if roberta else ("cls.predictions.", "cls.predictions.transform.LayerNorm")
        dense = "lm_head.dense" if roberta else "cls.predictions.transform.dense"
        out = [
            _rule(dense + ".weight", "head/transform/w", (d, d), _transpose()),
            _rule(dense + ".bias", "head/transform/b", (d,), _identity()),
            _rule(norm + ".weight", "head/norm/scale", (d,), _identity()),
            _rule(norm + ".bias", "head/norm/bias", (d,), _identity()),
        ]
        if cfg.tie_embeddings:
            return out + [_rule(p + "bias", "head/bias", (V,), _vocab_bias(V, Vp))]
        # untied, transformers unties the decoder's bias from `bias` too, and reads only the decoder's
        return out + [_rule(p + "decoder.weight", "head/w", (V, d), _vocab_head(V, Vp)),
                      _rule(p + "decoder.bias", "head/bias", (V,), _vocab_bias(V, Vp))]
    raise HFInteropError(f"model head '{cfg.head}' has no Hugging Face encoder counterpart; lmtrain exports "
                         f"{', '.join(_ENCODER_HEADS)}.")


def _skip_rows(offset: int) -> tuple[Callable, Callable]:
    """RoBERTa's position table <-> lmtrain's: the first `offset` rows (padding and below) are never read for a
    real token; they are dropped on import and written as zeros on export."""

    def to_hf(xs):
        return _c(np.concatenate([np.zeros((offset, xs[0].shape[1]), xs[0].dtype), xs[0]]))

    return (lambda w: (_c(w[offset:]),)), to_hf


def _vocab_bias(vocab: int, padded: int) -> tuple[Callable, Callable]:
    """The MLM head's per-token bias [vocab] <-> [padded_vocab] (padding entries zero, never predicted)."""

    def to_lm(b):
        out = np.zeros((padded,), b.dtype)
        out[:vocab] = b
        return (out,)

    return to_lm, (lambda xs: _c(xs[0][:vocab]))


def encoder_fits(cfg: ModelConfig) -> bool:
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
        ignored_suffixes=("embeddings.position_ids",),  # a buffer of older checkpoints
        # tied copies (of the embedding; an untied head's unused `bias`), and what pretraining checkpoints carry
        # besides a masked-LM head
        optional=(*mlm_tied, base + "pooler.dense.weight", base + "pooler.dense.bias", "cls.seq_relationship.weight",
                  "cls.seq_relationship.bias"),
        classifier=classes["classify"],
        heads=tuple(classes.items()),
    )


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        architectures=("GPT2LMHeadModel",),
        model_type="gpt2",
        base_prefix="transformer.",
        config_to_lm=_gpt2_config_to_lm,
        config_to_hf=_gpt2_config_to_hf,
        rules=_gpt2_rules,
        ignored_suffixes=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of old GPT-2 checkpoints
        optional=("lm_head.weight",),
        classifier="GPT2ForSequenceClassification",
    ),
    "llama": Family(
        name="llama",
        architectures=("LlamaForCausalLM",),
        model_type="llama",
        base_prefix="model.",
        config_to_lm=_llama_like_config_to_lm("Llama", qkv_bias=False),
        config_to_hf=_llama_like_config_to_hf("LlamaForCausalLM", "llama"),
        rules=_llama_like_rules,
        ignored_suffixes=(".rotary_emb.inv_freq",),
        optional=("lm_head.weight",),
        classifier="LlamaForSequenceClassification",
    ),
    "mistral": Family(
        name="mistral",
        architectures=("MistralForCausalLM",),
        model_type="mistral",
        base_prefix="model.",
        config_to_lm=_llama_like_config_to_lm("Mistral", qkv_bias=False),
        config_to_hf=_llama_like_config_to_hf("MistralForCausalLM", "mistral"),
        rules=_llama_like_rules,
        ignored_suffixes=(".rotary_emb.inv_freq",),
        optional=("lm_head.weight",),
        classifier="MistralForSequenceClassification",
    ),
    "qwen2": Family(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        model_type="qwen2",
        base_prefix="model.",
        config_to_lm=_llama_like_config_to_lm("Qwen2", qkv_bias=True),
        config_to_hf=_llama_like_config_to_hf("Qwen2ForCausalLM", "qwen2"),
        rules=_llama_like_rules,
        ignored_suffixes=(".rotary_emb.inv_freq",),
        optional=("lm_head.weight",),
        classifier="Qwen2ForSequenceClassification",
    ),
    "bert": _encoder_family("bert", "Bert", roberta=False),
    "roberta": _encoder_family("roberta", "Roberta", roberta=True),
}

SUPPORTED_ARCHITECTURES = tuple(dict.fromkeys(a for fam in FAMILIES.values()
                                              for a in (*fam.architectures, fam.classifier, *dict(fam.heads).values())))


def family_for_hf_config(hf: dict, source: str) -> Family:
    """The family named by config.json's `architectures` (or `model_type`); an error lists the supported ones."""
    names = hf.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HFInteropError(f"{source}: 'architectures' is {names!r}; it must be a list of class names such as "
                             f"[\"{SUPPORTED_ARCHITECTURES[0]}\"]. Fix config.json.")
    for fam in FAMILIES.values():
        known = (*fam.architectures, fam.classifier)
        if any(n in known for n in names) or (not names and hf.get("model_type") == fam.model_type):
            return fam
    found = ", ".join(names) if names else f"model_type={hf.get('model_type')!r}"
    raise HFInteropError(
        f"{source}: architecture {found} is not supported. lmtrain imports: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )


def family_for_model(cfg: ModelConfig, preferred: str | None = None) -> Family:
    """The HF family that reproduces an lmtrain model exactly; `preferred` (the imported family) wins if it fits."""
    if not cfg.causal:
        if not encoder_fits(cfg):
            raise HFInteropError(
                "no Hugging Face encoder reproduces this lmtrain model exactly (model.causal=False). BERT and RoBERTa "
                "need pos_embedding='learned', norm='layernorm', mlp='gelu_exact' (or 'gelu'), use_bias=True, "
                "n_kv_heads=n_heads, norm_position='post', embed_norm=True and type_vocab_size >= 1; this model has "
                f"pos_embedding={cfg.pos_embedding}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, "
                f"norm_position={cfg.norm_position}, embed_norm={cfg.embed_norm}, type_vocab_size={cfg.type_vocab_size}.")
        return FAMILIES["roberta" if preferred == "roberta" else "bert"]
    if cfg.norm_position != "pre" or cfg.embed_norm or cfg.type_vocab_size:
        raise HFInteropError(f"no Hugging Face decoder has norm_position={cfg.norm_position}, embed_norm={cfg.embed_norm} "
                             f"or type_vocab_size={cfg.type_vocab_size} (encoder parts); a decoder exports with the "
                             "defaults 'pre', False and 0.")
    fits = {
        "gpt2": cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.use_bias
        and not cfg.qkv_bias and cfg.n_kv_heads == cfg.n_heads and cfg.resolved_head_dim * cfg.n_heads == cfg.d_model,
        "llama": cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.use_bias
        and not cfg.qkv_bias,
        "qwen2": cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.use_bias
        and cfg.qkv_bias,
    }
    fits["mistral"] = fits["llama"]
    if preferred in fits and fits[preferred]:
        return FAMILIES[preferred]
    for name in ("gpt2", "llama", "qwen2"):
        if fits[name]:
            return FAMILIES[name]
    raise HFInteropError(
        f"no Hugging Face family reproduces this lmtrain model exactly (pos_embedding={cfg.pos_embedding}, "
        f"norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, qkv_bias={cfg.qkv_bias}). Exportable: GPT-2 "
        "(learned, layernorm, gelu, use_bias), Llama/Mistral (rope, rmsnorm, swiglu, no biases), Qwen2 (as Llama "
        "with qkv_bias)."
    )


def classifier_labels(hf: HFConfig) -> list[str]:
    """A sequence classifier's label names in class order, from config.json's `id2label`."""
    id2label = hf.get("id2label")
    if id2label is None:
        n = hf.positive_int("num_labels", 2)
        return [f"LABEL_{i}" for i in range(n)]
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise hf._bad("id2label", id2label, 'an object mapping class ids to names, e.g. {"0": "negative"}')
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except ValueError:
        raise hf._bad("id2label", id2label, "keyed by class ids 0, 1, ...") from None
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) < 2:
        raise hf._bad("id2label", id2label, "keyed by the class ids 0 to num_labels-1, with at least 2 classes")
    labels = [by_id[i] for i in range(len(by_id))]
    if len(set(labels)) != len(labels):
        raise hf._bad("id2label", id2label, "a distinct name for each class")
    return labels
