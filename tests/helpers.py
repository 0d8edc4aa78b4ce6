"""Small configs and runners shared by the tests."""

from __future__ import annotations

from lmtrain.config import base_config


def small_config(family: str = "llama", **overrides):
    """A config small enough for a few CPU steps, in the GPT-2 or the Llama family."""
    c = base_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 256, 64, 2, 4, 128, 32
    if family == "gpt2":
        m.pos_embedding, m.norm, m.mlp, m.use_bias, m.tie_embeddings, m.n_kv_heads = (
            "learned", "layernorm", "gelu", True, True, 4)
    else:
        m.n_kv_heads = 2
    c.data.seq_len, c.data.batch_size = 16, 8
    c.optimizer.warmup_steps = 2
    c.train.steps = 10
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    c.logging.loss_curve_png = False
    c.train.sample_tokens = 0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c
