"""A Llama-style ~1B model (Llama-3.2-1B shape): RoPE, RMSNorm, SwiGLU, GQA with 8 KV heads.

    lmtrain train --config=llama_1b --workdir=runs/llama_1b --config.data.source=shards \
        --config.data.shards_dir=DATA --config.data.tokenizer_dir=TOK --config.mesh.fsdp=-1 --config.mesh.data=1
"""

from lmtrain.config import base_config, shrink_to_cpu


def llama_family(c):
    """The Llama switches, shared by llama_1b and llama2_7b."""
    m = c.model
    m.pos_embedding = "rope"
    m.norm = "rmsnorm"
    m.mlp = "swiglu"
    m.use_bias = False
    m.tie_embeddings = False
    m.dtype = "bfloat16"
    m.logits_dtype = "bfloat16"  # halves the [batch, length, vocab] activation; the loss still reduces in fp32
    m.scan_layers = True
    m.remat = "save_dots"
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.mesh.data = 1  # FSDP over every device: parameters and optimizer state sharded ZeRO-3 style
    c.mesh.fsdp = -1
    return c


ARGS = ("runlocal",)  # what --config=llama_1b:ARG accepts


def get_config(arg: str = ""):
    c = llama_family(base_config())
    m = c.model
    m.vocab_size = 128256  # Llama-3 tokenizer
    m.d_model = 2048
    m.n_layers = 16
    m.n_heads = 32
    m.n_kv_heads = 8
    m.d_ff = 8192
    m.max_seq_len = 8192
    m.rope_theta = 500000.0
    m.tie_embeddings = True  # Llama-3.2-1B ties the head to the embedding
    c.data.seq_len = 2048
    c.data.batch_size = 256  # 0.5M tokens per step
    c.optimizer.lr = 3e-4
    c.optimizer.schedule = "wsd"
    c.optimizer.warmup_steps = 2000
    c.train.steps = 100000
    c.train.eval_every = 2000
    c.checkpoint.every = 1000
    if arg == "runlocal":  # the same family, CPU-sized, on the built-in corpus
        shrink_to_cpu(c, d_ff=384, n_kv_heads=2)
    return c
