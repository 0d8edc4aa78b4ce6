"""The T5-family encoder-decoder and its functional interface (`T5ModelDef`).

One shared token embedding feeds both stacks. Each stack has one relative-position bias table that all of its
layers use (bidirectional buckets in the encoder, causal ones in the decoder) and a final RMSNorm; its blocks'
parameters are stacked on a leading `layers` axis, as in the decoder-only Transformer, and run under a scan.
The LM head is the embedding itself (tied) or a [d_model, vocab] matrix; T5 v1.0 scales the decoder output by
d_model**-0.5 before it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.encdec.config import T5Config
from lmtrain.model.encdec.layers import T5Block, position_bias
from lmtrain.model.layers import Norm, _dropout, _param
from lmtrain.parallel.partitioning import constrain

# The final norm's dropout key: a stream apart from the layers' (fold_in 0..L-1).
_FINAL_DROPOUT_STREAM = 2**31 - 1


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stacked_blocks(cfg: T5Config, n_layers: int, decoder: bool, rngs: nnx.Rngs) -> T5Block:
    """n_layers T5Blocks whose parameters are stacked on a leading `layers` axis."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: T5Block(cfg, nnx.Rngs(0), decoder)))
    keys = jax.random.split(rngs.params(), n_layers)
    state = jax.vmap(lambda key: nnx.state(T5Block(cfg, nnx.Rngs(params=key), decoder)))(keys)
    state = jax.tree.map(lambda v: nnx.Param(v[...], logical_axes=("layers", *v.logical_axes)), state,
                         is_leaf=_is_variable)
    return nnx.merge(graphdef, state)


class T5Stack(nnx.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): blocks, a relative-position bias
    table shared by its layers, and a final norm."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, decoder: bool):
        self.cfg, self.decoder = cfg, decoder
        n_layers = cfg.decoder_layers if decoder else cfg.n_layers
        self.rel_bias = _param(rngs.params(), (cfg.relative_buckets, cfg.n_heads), (None, "heads"),
                               cfg.d_model ** -0.5, cfg.weight_dtype)
        self.blocks = _stacked_blocks(cfg, n_layers, decoder, rngs)
        self.final_norm = Norm(cfg)

    def bias(self, query_positions_T, key_positions_S):
        return position_bias(self.rel_bias, query_positions_T, key_positions_S, not self.decoder, self.cfg)

    def run(self, x_BxTxD, bias_xNxTxS, mask_BxTxS, enc_BxSxD=None, enc_mask_BxTxS=None, dropout_key=None):
        """All blocks over a whole sequence, then the final norm (and its dropout)."""
        block_def, block_state = nnx.split(self.blocks)

        def layer(x, xs):
            layer_state, index = xs
            block = nnx.merge(block_def, layer_state)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            cross = None if enc_BxSxD is None else (*block.cross.keys_values(enc_BxSxD), enc_mask_BxTxS)
            return block(x, bias_xNxTxS, mask_BxTxS, cross, key=key), None

        n_layers = jax.tree.leaves(block_state)[0].shape[0]
        x_BxTxD, _ = jax.lax.scan(layer, x_BxTxD, (block_state, jnp.arange(n_layers)))
        return self.finish(x_BxTxD, dropout_key)

    def finish(self, x_BxTxD, dropout_key=None):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, _FINAL_DROPOUT_STREAM)
        return _dropout(self.final_norm(x_BxTxD), self.cfg.dropout, key)


class T5(nnx.Module):
    """Encoder input ids (with their padding mask) and decoder input ids in, next-token logits out."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.weight_dtype
        self.embed = _param(rngs.params(), (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), 1.0, dt)
        self.encoder = T5Stack(cfg, rngs, decoder=False)
        self.decoder = T5Stack(cfg, rngs, decoder=True)
        self.head = None if cfg.tie_embeddings else _param(
            rngs.params(), (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), 1.0, dt)

    def embed_tokens(self, tokens_BxL, dropout_key=None):
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.compute_dtype)
        return constrain(_dropout(x_BxLxD, self.cfg.dropout, dropout_key), ("batch", "length", "act_embed"))

    def encode(self, tokens_BxS, mask_BxS, dropout_key=None, segments_BxS=None):
        """The encoder output [B, S, D]. `mask_BxS` is True on real tokens: padding keys are masked out; a padding
        query still attends to the real tokens (its output is never read), as in transformers. With
        `segments_BxS` (packed examples), a query sees only the keys of its own segment."""
        k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x_BxSxD = self.embed_tokens(tokens_BxS, k_embed)
        positions_S = jnp.arange(tokens_BxS.shape[1])
        mask_BxSxS = jnp.broadcast_to(mask_BxS[:, None, :].astype(bool), (*tokens_BxS.shape, tokens_BxS.shape[1]))
        if segments_BxS is not None:
            mask_BxSxS = mask_BxSxS & same_segment(segments_BxS, segments_BxS)
        return self.encoder.run(x_BxSxD, self.encoder.bias(positions_S, positions_S), mask_BxSxS,
                                dropout_key=k_stack)

    def decode(self, tokens_BxT, enc_BxSxD, enc_mask_BxS, mask_BxT=None, dropout_key=None, segments_BxT=None,
               enc_segments_BxS=None):
        """Teacher-forced logits [B, T, padded vocab] of the decoder inputs against the encoder output; `mask_BxT`
        (optional) masks padding decoder keys besides the causal mask. With segment ids (packed examples, both
        given), a decoder query sees only the decoder and encoder keys of its own segment."""
        k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        b, t = tokens_BxT.shape
        x_BxTxD = self.embed_tokens(tokens_BxT, k_embed)
        positions_T = jnp.arange(t)
        mask_BxTxT = jnp.broadcast_to(positions_T[:, None] >= positions_T[None, :], (b, t, t))
        if mask_BxT is not None:
            mask_BxTxT = mask_BxTxT & mask_BxT[:, None, :].astype(bool)
        enc_mask_BxTxS = jnp.broadcast_to(enc_mask_BxS[:, None, :].astype(bool), (b, t, enc_mask_BxS.shape[1]))
        if segments_BxT is not None:
            mask_BxTxT = mask_BxTxT & same_segment(segments_BxT, segments_BxT)
            enc_mask_BxTxS = enc_mask_BxTxS & same_segment(segments_BxT, enc_segments_BxS)
        x_BxTxD = self.decoder.run(x_BxTxD, self.decoder.bias(positions_T, positions_T), mask_BxTxT, enc_BxSxD,
                                   enc_mask_BxTxS, k_stack)
        return self.logits(x_BxTxD)

    def logits(self, x_BxTxD):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        if cfg.scale_decoder_outputs:
            x_BxTxD = x_BxTxD * jnp.asarray(cfg.d_model ** -0.5, dtype)
        w_DxV = self.embed[...].astype(dtype).T if self.head is None else self.head[...].astype(dtype)
        logits = jnp.einsum("btd,dv->btv", x_BxTxD, w_DxV, preferred_element_type=jnp.dtype(cfg.logits_dtype))
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, enc_tokens_BxS, enc_mask_BxS, dec_tokens_BxT, dec_mask_BxT=None, dropout_key=None,
                 enc_segments_BxS=None, dec_segments_BxT=None):
        k_enc, k_dec = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        enc_BxSxD = self.encode(enc_tokens_BxS, enc_mask_BxS, k_enc, enc_segments_BxS)
        return self.decode(dec_tokens_BxT, enc_BxSxD, enc_mask_BxS, dec_mask_BxT, k_dec, dec_segments_BxT,
                           enc_segments_BxS)


def same_segment(query_segments_BxT, key_segments_BxS):
    """[B, T, S]: True where a query and a key belong to the same packed example."""
    return query_segments_BxT[:, :, None] == key_segments_BxS[:, None, :]


def _nested_set(tree: dict, keys, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


class T5ModelDef:
    """The encoder-decoder as pure functions over a plain nested dict of parameters, like `ModelDef`:
    `init(key)`, `apply(params, ...)`, `encode`/`decode`, and `logical_axes` / `shapes` without allocating."""

    def __init__(self, cfg: T5Config):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: T5(cfg, nnx.Rngs(0)))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        self.logical_axes: dict = {}
        self.shapes: dict = {}
        flat, _ = jax.tree_util.tree_flatten_with_path(self._abstract_state, is_leaf=_is_variable)
        for path, var in flat:
            keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
            _nested_set(self.logical_axes, keys, tuple(var.logical_axes))
            _nested_set(self.shapes, keys, jax.ShapeDtypeStruct(var.shape, var.dtype))

    # Equal configs, equal definitions: a jitted function that takes the definition as a static argument
    # (generation) compiles once per config, not once per instance.
    def __hash__(self) -> int:
        return hash(self.cfg)

    def __eq__(self, other) -> bool:
        return isinstance(other, T5ModelDef) and other.cfg == self.cfg

    def init(self, key: jax.Array) -> dict:
        return nnx.to_pure_dict(nnx.state(T5(self.cfg, nnx.Rngs(params=key))))

    def bind(self, params: dict) -> T5:
        state = jax.tree.map(lambda v: v, self._abstract_state, is_leaf=_is_variable)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def apply(self, params: dict, enc_tokens_BxS, enc_mask_BxS, dec_tokens_BxT, dec_mask_BxT=None, dropout_key=None,
              enc_segments_BxS=None, dec_segments_BxT=None):
        """Teacher-forced logits [B, T, padded vocab]; segment ids keep packed examples apart."""
        return self.bind(params)(enc_tokens_BxS, enc_mask_BxS, dec_tokens_BxT, dec_mask_BxT, dropout_key,
                                 enc_segments_BxS, dec_segments_BxT)

    def encode(self, params: dict, enc_tokens_BxS, enc_mask_BxS):
        return self.bind(params).encode(enc_tokens_BxS, enc_mask_BxS)

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in jax.tree.leaves(self.shapes))
