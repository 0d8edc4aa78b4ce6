"""Supervised fine-tuning demo: the default job's model learns to write a standard-library function's docstring
summary from its signature (`shutil.copyfile(src, dst, *, follow_symlinks=True)` -> `Copy data from src to dst
in the most efficient way possible.`). No download. From the repository root, after the README's first command
(which trains workdir/tiny with the tokenizer workdir/tokenizer):

    python tools/shard_data.py --builtin-task sft --tokenizer workdir/tokenizer --seq-len 128 --output workdir/sft_shards
    lmtrain train --config=tiny_sft --workdir=workdir/tiny_sft
    lmtrain eval workdir/tiny_sft --data workdir/sft_shards --split test --baseline workdir/tiny

The loss falls only on the summary and the EOS that ends it; examples are packed whole. At each evaluation
the first 16 validation examples are generated greedily and scored (val_bleu, val_chrf, val_rouge_l,
val_exact_match in metrics.jsonl and TensorBoard).
"""

from lmtrain.config import load_config

ARGS = ("runlocal",)  # what --config=NAME:ARG accepts


def get_config(arg: str = ""):
    c = load_config("tiny")  # the default job's model and tokenizer, which this run starts from
    c.task.name = "sft"  # prompt -> completion, loss on the completion only
    c.task.eval_generate_examples = 16  # generative metrics at each evaluation on a fixed validation subset
    c.data.shards_dir = "workdir/sft_shards"  # tools/shard_data.py --builtin-task sft (see the docstring)
    c.train.init_from = "workdir/tiny"  # the default job's WORKDIR
    c.train.init_from_which = "latest"  # its final checkpoint
    c.optimizer.lr = 2e-3  # below the pretraining peak (3e-3); 1e-3 learned the format but little content in time
    c.optimizer.warmup_steps = 20
    c.train.steps = 600  # about 8 passes over the ~3,500 training examples, minutes on 2 CPU cores
    c.train.eval_every = 100
    c.train.eval_batches = 0  # the whole validation split
    c.train.sample_tokens = 0  # the generative metrics show the samples that matter here
    c.checkpoint.every = 100
    if arg == "runlocal":  # seconds, for tests: a few steps, small evaluations
        c.train.steps, c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 20, 10, 2, 10
        c.optimizer.warmup_steps = 5
    return c
