"""GPT-2 medium (350M): the GPT-2 family at d_model 1024, 24 layers, 16 heads.

    lmtrain train --config=gpt2_medium --workdir=runs/gpt2_medium --config.data.source=shards \
        --config.data.shards_dir=DATA --config.data.tokenizer_dir=TOK
"""

from configs.gpt2_small import gpt2_family
from lmtrain.config import base_config


def get_config(arg: str = ""):
    c = gpt2_family(base_config())
    m = c.model
    m.d_model = 1024
    m.n_layers = 24
    m.n_heads = 16
    m.n_kv_heads = 16
    m.d_ff = 4096
    m.scan_layers = True  # 24 layers: scan keeps compile time flat
    m.remat = "save_dots"  # keep matmul outputs, recompute the cheap element-wise ops
    c.data.batch_size = 512
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 1000
    c.train.steps = 40000
    c.train.eval_every = 1000
    c.checkpoint.every = 1000
    if arg == "runlocal":
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 4096, 128, 2, 4, 4, 512
        m.max_seq_len, m.dtype, m.logits_dtype = 128, "float32", "float32"
        c.data.seq_len, c.data.batch_size = 128, 8
        c.optimizer.warmup_steps, c.train.steps, c.train.eval_every, c.checkpoint.every = 10, 50, 25, 25
    return c
