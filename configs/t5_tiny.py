"""Sequence-to-sequence demo: a small T5-style encoder-decoder (v1.1 / Flan-T5 switches: gated-GELU, untied head)
learns to write a standard-library function's docstring summary from its signature, the built-in SFT demo as a
seq2seq task: the signature is the encoder's input, the summary the decoder's target. About the size of the
default job's model (2.0M parameters against tiny's 1.8M), trained from scratch. No download. From the
repository root, after the README's first commands (the tokenizer workdir/tokenizer):

    python tools/shard_data.py --builtin-task sft --tokenizer workdir/tokenizer --seq-len 128 --output workdir/sft_shards
    lmtrain train --config=t5_tiny --workdir=workdir/t5_tiny

The loss falls only on the summary and the EOS that ends it; examples are packed whole (lmtrain.tasks.seq2seq).
Evaluation reports val_loss and val_perplexity on the validation split.
"""

from lmtrain.config import load_config

ARGS = ("runlocal",)  # what --config=NAME:ARG accepts


def get_config(arg: str = ""):
    c = load_config("tiny")  # the default job's tokenizer, sequence length and batch
    c.task.name = "seq2seq"  # prompt -> encoder, completion -> decoder target; loss on the target only
    c.model.arch = "t5"  # lmtrain.model.encdec
    c.model.n_layers = 2  # encoder blocks
    c.model.n_decoder_layers = 2
    c.model.n_heads = 4
    c.model.head_dim = 32  # T5's d_kv
    c.model.d_ff = 384
    c.model.mlp = "gated-gelu"  # T5 v1.1 / Flan-T5; 'relu' for T5 v1.0
    c.model.relative_buckets = 32
    c.model.relative_max_distance = 128  # = data.seq_len: every distance in a row has its own bucket range
    c.model.dropout = 0.0
    # The built-in tokenizer's one special token, <|endoftext|> (id 0), ends and pads examples; the decoder
    # starts from it as T5 starts from its pad.
    c.model.pad_id, c.model.eos_id, c.model.decoder_start_id = 0, 0, 0
    c.data.shards_dir = "workdir/sft_shards"  # tools/shard_data.py --builtin-task sft (see the docstring)
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.train.steps = 600  # about 8 passes over the ~3,500 training examples
    c.train.eval_every = 100
    c.train.eval_batches = 0  # the whole validation split
    c.train.sample_tokens = 0  # sampling is decoder-only
    c.checkpoint.every = 100
    if arg == "runlocal":  # seconds, for tests: a few steps, small evaluations
        c.train.steps, c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 20, 10, 2, 10
        c.optimizer.warmup_steps = 5
    return c
