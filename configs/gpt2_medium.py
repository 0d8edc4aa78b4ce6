"""GPT-2 medium (350M): the GPT-2 family at d_model 1024, 24 layers, 16 heads.

    lmtrain train --config=gpt2_medium --workdir=runs/gpt2_medium --config.data.source=shards \
        --config.data.shards_dir=DATA --config.data.tokenizer_dir=TOK
"""

from configs.gpt2_small import gpt2_family
from lmtrain.config import base_config, shrink_to_cpu

ARGS = ("runlocal",)  # what --config=gpt2_medium:ARG accepts


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
    if arg == "runlocal":  # the same family, CPU-sized, on the built-in corpus
        shrink_to_cpu(c)
    return c
