"""The default job: a small Llama-style model on the built-in corpus, a few minutes on 2 CPU cores.

No download: the corpus is the text that ships with Python. From the repository root:

    python tools/train_tokenizer.py --builtin --vocab-size 4096 --output workdir/tokenizer
    python tools/shard_data.py --builtin --tokenizer workdir/tokenizer --output workdir/shards
    lmtrain train --config=tiny --workdir=workdir/tiny

`--config.data.source=builtin` skips the toolchain: the corpus is packed in memory and a tokenizer
is trained into WORKDIR/tokenizer at first start.
"""

from lmtrain.config import base_config

ARGS = ("smoke",)  # what --config=tiny:ARG accepts


def get_config(arg: str = ""):
    c = base_config()
    c.model.vocab_size = 4096  # BPE vocab trained on the built-in corpus
    c.model.d_model = 128  # small enough for a CPU
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2  # grouped-query attention, two query heads per KV head
    c.model.d_ff = 384  # SwiGLU hidden width (about 8/3 d_model, rounded)
    c.model.max_seq_len = 128
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.source = "shards"  # written by tools/shard_data.py (see the docstring)
    c.data.shards_dir = "workdir/shards"
    c.data.tokenizer_dir = "workdir/tokenizer"
    c.data.val_fraction = 0.1  # builtin source only: ~40 documents held out
    c.optimizer.lr = 3e-3  # small models take a large step
    c.optimizer.warmup_steps = 30
    c.train.steps = 400
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 0  # the whole validation split
    c.checkpoint.every = 100
    if arg == "smoke":  # seconds, for tests: fewer steps, tiny corpus
        c.data.max_docs = 150
        c.train.steps = 20
        c.train.eval_every = 10
        c.train.eval_batches = 2
        c.checkpoint.every = 10
        c.optimizer.warmup_steps = 5
        c.train.sample_tokens = 8
    return c
