"""GPT-2 small (124M): learned positions, LayerNorm, GELU, biases, tied embeddings.

    lmtrain train --config=gpt2_small --workdir=runs/gpt2_small --config.data.source=shards \
        --config.data.shards_dir=DATA --config.data.tokenizer_dir=TOK
    lmtrain train --config=gpt2_small:runlocal   # same shape family, CPU-sized, built-in corpus
"""

from lmtrain.config import base_config, shrink_to_cpu


def gpt2_family(c):
    """The GPT-2 switches, shared by gpt2_small and gpt2_medium."""
    m = c.model
    m.vocab_size = 50257  # GPT-2 BPE; padded to 50304 rows in the embedding
    m.max_seq_len = 1024
    m.pos_embedding = "learned"
    m.norm = "layernorm"
    m.mlp = "gelu"
    m.use_bias = True
    m.tie_embeddings = True
    m.dtype = "bfloat16"  # bf16 compute, fp32 parameters and optimizer state
    m.logits_dtype = "bfloat16"  # halves the largest activation; the loss still reduces in fp32
    c.data.seq_len = 1024
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.1
    return c


ARGS = ("runlocal",)  # what --config=gpt2_small:ARG accepts


def get_config(arg: str = ""):
    c = gpt2_family(base_config())
    m = c.model
    m.d_model = 768
    m.n_layers = 12
    m.n_heads = 12
    m.n_kv_heads = 12
    m.d_ff = 3072
    c.data.batch_size = 512  # 0.5M tokens per step
    c.train.grad_accum = 8  # 8 micro-batches of 64 x 1024: fits one 80 GB GPU; lower it on a pod
    c.optimizer.lr = 6e-4
    c.optimizer.warmup_steps = 700
    c.train.steps = 20000
    c.train.eval_every = 1000
    c.checkpoint.every = 1000
    if arg == "runlocal":  # the same family, CPU-sized, on the built-in corpus
        shrink_to_cpu(c)
    return c
