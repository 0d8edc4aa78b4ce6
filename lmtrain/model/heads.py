"""Output heads: what the transformer's final hidden states become.

A head is a module with `__call__(x_BxLxD, *, embed, segment_ids_BxL, dropout_key)`; it takes what it needs
(the LM head may reuse the token embedding, a classifier reads the last real token and, in training, drops
out its input at `model.classifier_dropout`). The model
picks one by `model.head`; adding a head is one class here and one line in `HEADS`.

Encoder heads (BERT): 'mlm' (masked-token logits, tied to the embedding), 'classify' with
`model.pooling='cls'` (the first token through the pooler), 'token_classify' (one label per token)
and 'pool' (the pooled first token itself, what Hugging Face's BertModel returns as pooler_output).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.layers import ModelConfig, Norm, _dropout, _param, dense
from lmtrain.parallel.partitioning import constrain


class LMHead(nnx.Module):
    """Next-token logits over the padded vocab, in `logits_dtype`; tied to the embedding when
    `tie_embeddings` (then it has no parameter of its own)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.w = None if cfg.tie_embeddings else _param(
            rngs.params(), (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg.init_std, cfg.weight_dtype)

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None, dropout_key=None):
        dtype = self.cfg.compute_dtype
        w_DxV = embed[...].astype(dtype).T if self.w is None else self.w[...].astype(dtype)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV, preferred_element_type=jnp.dtype(self.cfg.logits_dtype))
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))


def last_token_index(segment_ids_BxL, length: int) -> jax.Array:
    """Index of each row's last real (segment id > 0) token; the last slot when there is no padding info."""
    if segment_ids_BxL is None:
        return jnp.full((1,), length - 1, jnp.int32)
    slots_L = jnp.arange(length, dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids_BxL > 0, slots_L, 0), axis=-1)


class Dense(nnx.Module):
    """A [D, D] projection with a bias (BERT's pooler and masked-LM transform); `w`/`b` as the rules table expects."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.w = _param(rngs.params(), (cfg.d_model, cfg.d_model), ("embed", None), cfg.init_std, cfg.weight_dtype)
        self.b = _param(None, (cfg.d_model,), (None,), 0, cfg.weight_dtype)

    def __call__(self, x_xD):
        return dense(x_xD, self.w, "...d,de->...e", self.cfg.compute_dtype, self.b)


class Pooler(Dense):
    """BERT's pooler: tanh(dense(hidden state of the first token)), the [CLS] summary of the sequence."""

    def __call__(self, x_BxLxD):
        return jnp.tanh(super().__call__(x_BxLxD[:, 0]))


def _check_num_labels(cfg: ModelConfig, least: int = 2) -> None:
    if cfg.num_labels < least:
        raise ValueError(f"model.num_labels={cfg.num_labels}: a classification head needs at least {least} classes.")


class SequenceClassifierHead(nnx.Module):
    """Class logits from one hidden state per row. `model.pooling='last'`: each row's last real token, as
    Hugging Face's `*ForSequenceClassification` decoders do (a bias-free `score` projection). 'cls'
    (encoders): the first token through the pooler, then `score` with a bias, as BertForSequenceClassification."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        _check_num_labels(cfg, least=1)  # one output: a reward model's score (task.name=reward)
        self.cfg = cfg
        self.score = _param(rngs.params(), (cfg.d_model, cfg.num_labels), ("embed", None), cfg.init_std, cfg.weight_dtype)
        cls = cfg.pooling == "cls"
        self.pooler = Pooler(cfg, rngs) if cls else None
        self.bias = _param(None, (cfg.num_labels,), (None,), 0, cfg.weight_dtype) if cls else None

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None, dropout_key=None):
        if self.pooler is not None:
            pooled_BxD = self.pooler(x_BxLxD)
        else:
            last_B = last_token_index(segment_ids_BxL, x_BxLxD.shape[1])
            pooled_BxD = jnp.take_along_axis(x_BxLxD, jnp.broadcast_to(last_B, x_BxLxD.shape[:1])[:, None, None],
                                             axis=1)[:, 0]
        pooled_BxD = _dropout(pooled_BxD, self.cfg.classifier_dropout, dropout_key)
        logits_BxC = jnp.einsum("bd,dc->bc", pooled_BxD.astype(jnp.float32), self.score[...].astype(jnp.float32))
        return logits_BxC if self.bias is None else logits_BxC + self.bias[...].astype(jnp.float32)


class MaskedLMHead(nnx.Module):
    """BERT's masked-LM head: dense + the MLP's GELU + norm, then logits over the padded vocab through the
    token embedding (transposed; an own matrix only when `tie_embeddings` is off) plus a per-token bias."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.weight_dtype
        self.transform = Dense(cfg, rngs)
        self.norm = Norm(cfg)
        self.w = None if cfg.tie_embeddings else _param(
            rngs.params(), (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg.init_std, dt)
        self.bias = _param(None, (cfg.padded_vocab,), ("vocab",), 0, dt)

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None, dropout_key=None):
        dtype = self.cfg.compute_dtype
        h_BxLxD = self.norm(jax.nn.gelu(self.transform(x_BxLxD), approximate=self.cfg.mlp == "gelu"))
        w_DxV = embed[...].astype(dtype).T if self.w is None else self.w[...].astype(dtype)
        logits_dtype = jnp.dtype(self.cfg.logits_dtype)
        logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD, w_DxV, preferred_element_type=logits_dtype)
        logits_BxLxV = logits_BxLxV + self.bias[...].astype(logits_dtype)
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))


class TokenClassifierHead(nnx.Module):
    """Per-token class logits [B, L, num_labels] (named entities), as BertForTokenClassification's classifier."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        _check_num_labels(cfg, least=1)  # one output: a reward model's score (task.name=reward)
        self.cfg = cfg
        self.score = _param(rngs.params(), (cfg.d_model, cfg.num_labels), ("embed", None), cfg.init_std, cfg.weight_dtype)
        self.bias = _param(None, (cfg.num_labels,), (None,), 0, cfg.weight_dtype)

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None, dropout_key=None):
        x_BxLxD = _dropout(x_BxLxD, self.cfg.classifier_dropout, dropout_key)
        logits_BxLxC = jnp.einsum("bld,dc->blc", x_BxLxD.astype(jnp.float32), self.score[...].astype(jnp.float32))
        return logits_BxLxC + self.bias[...].astype(jnp.float32)


class PoolerHead(nnx.Module):
    """The pooled first token [B, D] (Hugging Face BertModel's pooler_output): a sentence vector, and the
    head a bare BertModel imports into."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pooler = Pooler(cfg, rngs)

    def __call__(self, x_BxLxD, *, embed: nnx.Param, segment_ids_BxL=None, dropout_key=None):
        return self.pooler(x_BxLxD).astype(jnp.float32)


HEADS = {
    "lm": LMHead,
    "classify": SequenceClassifierHead,
    "mlm": MaskedLMHead,
    "token_classify": TokenClassifierHead,
    "pool": PoolerHead,
}
