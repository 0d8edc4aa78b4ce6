"""The transformer and its functional interface (`ModelDef`) used by training, tasks and generation.

One Transformer covers GPT-2 (learned positions, LayerNorm, GELU, biases, tied embeddings),
Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied embeddings) and, with `causal=False`,
BERT-style encoders (token-type embeddings, an embedding norm, post-norm blocks). It returns hidden
states; a head module (lmtrain.model.heads) turns them into logits. The blocks' parameters are
stacked along a leading `layers` axis, so the same checkpoint layout serves both the scanned and
the unrolled forward pass, and the KV-cache decode runs the very same blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.heads import HEADS
from lmtrain.model.layers import Block, ModelConfig, Norm, _dropout, _param
from lmtrain.parallel.partitioning import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers Blocks whose parameters are stacked on a leading `layers` axis."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), cfg.n_layers)
    state = jax.vmap(lambda key: nnx.state(Block(cfg, nnx.Rngs(params=key))))(keys)
    state = jax.tree.map(
        lambda v: nnx.Param(v[...], logical_axes=("layers", *v.logical_axes)), state, is_leaf=_is_variable
    )
    return nnx.merge(graphdef, state)


class Transformer(nnx.Module):
    """Token ids in, final (normed) hidden states out through `hidden`; `__call__` adds the head
    (`model.head`: next-token logits over the padded vocab for 'lm', class logits for 'classify')."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.weight_dtype
        self.embed = _param(rngs.params(), (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg.init_std, dt)
        learned = cfg.pos_embedding == "learned"
        self.pos_embed = (
            _param(rngs.params(), (cfg.max_seq_len, cfg.d_model), (None, "embed"), cfg.init_std / 2, dt) if learned else None
        )
        self.type_embed = (
            _param(rngs.params(), (cfg.type_vocab_size, cfg.d_model), (None, "embed"), cfg.init_std, dt)
            if cfg.type_vocab_size else None
        )
        self.embed_norm = Norm(cfg) if cfg.embed_norm else None
        self.blocks = _stacked_blocks(cfg, rngs)
        # post-norm blocks end in a norm already
        self.final_norm = Norm(cfg) if cfg.norm_position == "pre" else None
        if cfg.head not in HEADS:
            raise ValueError(f"model.head='{cfg.head}' is unknown. Choose one of: {', '.join(HEADS)}.")
        self.head = HEADS[cfg.head](cfg, rngs)

    def embed_tokens(self, tokens_BxL, positions_BxL, token_types_BxL=None):
        dtype = self.cfg.compute_dtype
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dtype)
        if self.pos_embed is not None:
            x_BxLxD = x_BxLxD + jnp.take(self.pos_embed[...], positions_BxL, axis=0).astype(dtype)
        if self.type_embed is not None:  # no token types given: every token is of type 0, as in transformers
            types_BxL = jnp.zeros_like(tokens_BxL) if token_types_BxL is None else token_types_BxL
            x_BxLxD = x_BxLxD + jnp.take(self.type_embed[...], types_BxL, axis=0).astype(dtype)
        if self.embed_norm is not None:
            x_BxLxD = self.embed_norm(x_BxLxD)
        return constrain(x_BxLxD, ("batch", "length", "act_embed"))

    def hidden(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, dropout_key=None, cache=None,
               token_types_BxL=None):
        """Final hidden states [B, L, D]. With `cache` = (k_LxBxTxKxH, v_LxBxTxKxH, slot, mask_BxLxT), the
        tokens are decoded against a KV cache by the same blocks: returns (hidden, (k, v))."""
        cfg = self.cfg
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        x_BxLxD = self.embed_tokens(tokens_BxL, positions_BxL, token_types_BxL)
        if dropout_key is not None:
            dropout_key, k = jax.random.split(dropout_key)
            x_BxLxD = _dropout(x_BxLxD, cfg.dropout, k)

        block_def, block_state = nnx.split(self.blocks)
        if cache is not None:
            k_LxBxTxKxH, v_LxBxTxKxH, slot, mask_BxLxT = cache

            def cached_layer(x, xs):
                layer_state, k_BxTxKxH, v_BxTxKxH = xs
                block = nnx.merge(block_def, layer_state)
                return block(x, positions_BxL, None, None, (k_BxTxKxH, v_BxTxKxH, slot, mask_BxLxT))

            x_BxLxD, new_kv = jax.lax.scan(cached_layer, x_BxLxD, (block_state, k_LxBxTxKxH, v_LxBxTxKxH))
            return self._final_norm(x_BxLxD), new_kv

        def layer(x_BxLxD, layer_state, layer_index):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer_index)
            return nnx.merge(block_def, layer_state)(x_BxLxD, positions_BxL, segment_ids_BxL, key)

        if cfg.remat in _REMAT_POLICIES:
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            def body(x, xs):
                return layer(x, *xs), None

            x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, (block_state, jnp.arange(cfg.n_layers)))
        else:
            for i in range(cfg.n_layers):
                x_BxLxD = layer(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], block_state), i)
        return self._final_norm(x_BxLxD)

    def _final_norm(self, x_BxLxD):
        return x_BxLxD if self.final_norm is None else self.final_norm(x_BxLxD)

    def apply_head(self, x_BxLxD, segment_ids_BxL=None, dropout_key=None):
        return self.head(x_BxLxD, embed=self.embed, segment_ids_BxL=segment_ids_BxL, dropout_key=dropout_key)

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, dropout_key=None, token_types_BxL=None):
        x_BxLxD = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key, token_types_BxL=token_types_BxL)
        head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, HEAD_DROPOUT_STREAM)
        return self.apply_head(x_BxLxD, segment_ids_BxL, head_key)


# The head's dropout key: a stream of its own, apart from the embedding's (split) and the layers' (fold_in 0..L-1).
HEAD_DROPOUT_STREAM = 2**31 - 1


def _nested_set(tree: dict, keys, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


class ModelDef:
    """The model as pure functions over a plain nested dict of parameters.

    `init(key)` builds parameters, `apply(params, tokens, ...)` runs the forward pass.
    `logical_axes` and `shapes` describe every parameter without allocating any.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        self.logical_axes: dict = {}
        self.shapes: dict = {}
        flat, _ = jax.tree_util.tree_flatten_with_path(self._abstract_state, is_leaf=_is_variable)
        for path, var in flat:
            keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
            _nested_set(self.logical_axes, keys, tuple(var.logical_axes))
            _nested_set(self.shapes, keys, jax.ShapeDtypeStruct(var.shape, var.dtype))

    def init(self, key: jax.Array) -> dict:
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, nnx.Rngs(params=key))))

    def bind(self, params: dict) -> Transformer:
        """A Transformer module whose parameters are `params` (arrays or tracers)."""
        state = jax.tree.map(lambda v: v, self._abstract_state, is_leaf=_is_variable)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def apply(self, params: dict, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, dropout_key=None,
              token_types_BxL=None):
        """The head's output: logits [B, L, padded vocab] for 'lm' and 'mlm', [B, num_labels] for 'classify',
        [B, L, num_labels] for 'token_classify', the pooled [B, D] for 'pool'."""
        return self.bind(params)(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key, token_types_BxL)

    def hidden(self, params: dict, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, dropout_key=None,
               token_types_BxL=None):
        return self.bind(params).hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key,
                                        token_types_BxL=token_types_BxL)

    def num_params(self, include_embeddings: bool = True) -> int:
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.shapes)[0]:
            name = path[0].key
            if not include_embeddings and name in ("embed", "pos_embed", "type_embed"):
                continue
            n = 1
            for s in leaf.shape:
                n *= s
            total += n
        return total
