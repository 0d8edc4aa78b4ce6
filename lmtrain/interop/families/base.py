"""What every model family shares: the error, the config.json reader, tensor rules and their conversions.

A family is a config translation (HF `config.json` <-> lmtrain `model.*` fields), a list of `TensorRule`s, a
`fits()` test for export and PEFT's module names. A rule ties one HF tensor to one or more lmtrain parameters
(GPT-2's fused `c_attn` feeds wq, wk and wv) and carries the two conversions. Block parameters are stacked on a
leading layers axis in lmtrain, so a rule whose parameters live under `blocks/` applies once per layer, with
`{i}` in the HF name standing for the layer index. Import and export both read these tables; nothing else in
lmtrain knows an HF tensor name.

Every family is exact: a config that the lmtrain transformer cannot reproduce (another activation, biases where
lmtrain has none, another RoPE scaling) is refused with the setting named.
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

    def bad(self, key: str, value, want: str) -> HFInteropError:
        return HFInteropError(f"{self.source}: field '{key}' is {value!r}; it must be {want}. Fix config.json.")

    def positive_int(self, key: str, default: int | None = None) -> int:
        """A positive integer; without a default the field is required, with one a missing or null field takes it."""
        value = self[key] if default is None else self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.bad(key, value, "a positive integer")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        """A non-negative number; required without a default."""
        value = self[key] if default is None else self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.bad(key, value, "a non-negative number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
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

    def n_layers(self, cfg) -> int:
        """How many layers a per-layer rule runs over (an encoder-decoder's rules say which stack's)."""
        return cfg.n_layers


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # HF class names in config.json 'architectures'
    model_type: str
    base_prefix: str  # prefix of the base model's tensors; checkpoints of the bare base model omit it
    config_to_lm: Callable[[dict], tuple[dict, list[str]]]  # HF config -> (lmtrain model fields, notes)
    config_to_hf: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list[TensorRule]]
    fits: Callable[[ModelConfig], bool]  # whether this family reproduces an lmtrain model exactly (export)
    causal: bool = True  # a decoder; False: an encoder
    fallback: bool = True  # exports a model that fits when no imported family is preferred (Mistral: Llama does)
    needs: str = ""  # what `fits` asks of a model, for the error when no family fits
    # PEFT's names for the projections LoRA adapts (HF module name -> lmtrain's canonical targets); empty: no LoRA
    lora_modules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, hash=False)
    ignored_suffixes: tuple[str, ...] = ()  # non-parameter buffers some checkpoints carry (causal masks, inv_freq)
    optional: tuple[str, ...] = ()  # tensors that may be present and are not used (lm_head copy of tied embeddings)
    classifier: str = ""  # the HF *ForSequenceClassification class: lmtrain's 'classify' head
    heads: tuple[tuple[str, str], ...] = ()  # encoders: (lmtrain head, HF class), e.g. ('mlm', 'BertForMaskedLM')
    encoder_decoder: bool = False  # an lmtrain.model.encdec model (model.arch='t5'), not a ModelConfig transformer
    # fields the config.json cannot settle and the tensors do: (fields, read) -> fields, where read(name) is the
    # checkpoint's tensor or None (T5: whether the head is tied)
    settle_config: Callable[[dict, Callable], dict] | None = dataclasses.field(default=None, hash=False)

    def architecture(self, cfg: ModelConfig) -> str:
        """The HF class that holds an lmtrain model with `cfg.head`."""
        if self.encoder_decoder:
            return self.architectures[0]
        for head, architecture in self.heads:
            if head == cfg.head:
                return architecture
        return self.classifier if cfg.head == "classify" else self.architectures[0]

    def is_classifier(self, hf: dict) -> bool:
        return self.classifier in (hf.get("architectures") or [])

    def is_token_classifier(self, hf: dict) -> bool:
        return dict(self.heads).get("token_classify") in (hf.get("architectures") or [])


# ---------------------------------------------------------------------------------------------- conversions


def contiguous(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def identity() -> tuple[Callable, Callable]:
    return (lambda w: (contiguous(w),)), (lambda xs: contiguous(xs[0]))


def transpose() -> tuple[Callable, Callable]:
    """torch Linear weight [out, in] <-> lmtrain [in, out]."""
    return (lambda w: (contiguous(w.T),)), (lambda xs: contiguous(xs[0].T))


def linear_to_heads(d: int, n: int, h: int) -> tuple[Callable, Callable]:
    """torch Linear [n*h, d] (q/k/v projection) <-> lmtrain [d, n, h]."""
    return (lambda w: (contiguous(w.T.reshape(d, n, h)),)), (lambda xs: contiguous(xs[0].reshape(d, n * h).T))


def heads_to_linear(d: int, n: int, h: int) -> tuple[Callable, Callable]:
    """torch Linear [d, n*h] (output projection) <-> lmtrain [n, h, d]."""
    return (lambda w: (contiguous(w.T.reshape(n, h, d)),)), (lambda xs: contiguous(xs[0].reshape(n * h, d).T))


def bias_to_heads(n: int, h: int) -> tuple[Callable, Callable]:
    return (lambda b: (contiguous(b.reshape(n, h)),)), (lambda xs: contiguous(xs[0].reshape(n * h)))


def vocab_rows(vocab: int, padded: int) -> tuple[Callable, Callable]:
    """[vocab, d] <-> [padded_vocab, d]: padding rows are zero on import and dropped on export."""

    def to_lm(w):
        out = np.zeros((padded, w.shape[1]), w.dtype)
        out[:vocab] = w
        return (out,)

    return to_lm, (lambda xs: contiguous(xs[0][:vocab]))


def vocab_head(vocab: int, padded: int) -> tuple[Callable, Callable]:
    """torch lm_head [vocab, d] <-> lmtrain [d, padded_vocab]."""

    def to_lm(w):
        out = np.zeros((w.shape[1], padded), w.dtype)
        out[:, :vocab] = w.T
        return (out,)

    return to_lm, (lambda xs: contiguous(xs[0][:, :vocab].T))


def tensor_rule(hf: str, lm: str | tuple[str, ...], hf_shape: tuple[int, ...], conv: tuple[Callable, Callable]) -> TensorRule:
    lm = (lm,) if isinstance(lm, str) else lm
    return TensorRule(hf, lm, tuple(hf_shape), conv[0], conv[1])


# ---------------------------------------------------------------------------------------------- config helpers


def require(hf: HFConfig, key: str, allowed, family: str, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFInteropError(
            f"{hf.source} ({family}): {key}={value!r} is not supported (lmtrain reproduces {key} in "
            f"{sorted(map(repr, allowed))} exactly). Convert or fine-tune a model with a supported setting."
        )



def head_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The output head, the same in every family: a causal LM's lm_head (none when tied to the embedding), or a
    sequence classifier's bias-free `score` (HF [num_labels, d] <-> lmtrain head/score [d, num_labels])."""
    if cfg.head == "classify":
        return [tensor_rule("score.weight", "head/score", (cfg.num_labels, cfg.d_model), transpose())]
    if cfg.head != "lm":
        raise HFInteropError(f"model head '{cfg.head}' has no Hugging Face counterpart; lmtrain exports 'lm' "
                             "(*ForCausalLM) and 'classify' (*ForSequenceClassification).")
    if cfg.tie_embeddings:
        return []
    return [tensor_rule("lm_head.weight", "head/w", (cfg.vocab_size, cfg.d_model), vocab_head(cfg.vocab_size,
                                                                                        cfg.padded_vocab))]



def classifier_labels(hf: HFConfig) -> list[str]:
    """A sequence classifier's label names in class order, from config.json's `id2label`."""
    id2label = hf.get("id2label")
    if id2label is None:
        n = hf.positive_int("num_labels", 2)
        return [f"LABEL_{i}" for i in range(n)]
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise hf.bad("id2label", id2label, 'an object mapping class ids to names, e.g. {"0": "negative"}')
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except ValueError:
        raise hf.bad("id2label", id2label, "keyed by class ids 0, 1, ...") from None
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) < 2:
        raise hf.bad("id2label", id2label, "keyed by the class ids 0 to num_labels-1, with at least 2 classes")
    labels = [by_id[i] for i in range(len(by_id))]
    if len(set(labels)) != len(labels):
        raise hf.bad("id2label", id2label, "a distinct name for each class")
    return labels
