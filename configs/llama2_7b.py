"""A Llama-2-7B-shaped model: d_model 4096, 32 layers, 32 heads (MHA), SwiGLU 11008, RoPE theta 1e4.

Sized for a pod slice: FSDP over hosts, tensor parallelism inside a host.

    lmtrain train --config=llama2_7b --workdir=gs://BUCKET/runs/llama2_7b --config.data.source=shards \
        --config.data.shards_dir=DATA --config.data.tokenizer_dir=TOK --config.mesh.tensor=4
"""

from configs.llama_1b import llama_family
from lmtrain.config import base_config, shrink_to_cpu

ARGS = ("runlocal",)  # what --config=llama2_7b:ARG accepts


def get_config(arg: str = ""):
    c = llama_family(base_config())
    m = c.model
    m.vocab_size = 32000  # Llama-2 SentencePiece vocab
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 32
    m.d_ff = 11008
    m.max_seq_len = 4096
    m.norm_eps = 1e-5
    m.remat = "full"  # 7B activations: recompute everything in the backward pass
    c.data.seq_len = 4096
    c.data.batch_size = 256  # 1M tokens per step
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.train.steps = 250000
    c.train.eval_every = 2000
    c.checkpoint.every = 500
    if arg == "runlocal":  # the same family, CPU-sized, on the built-in corpus
        shrink_to_cpu(c, d_ff=384)
    return c
