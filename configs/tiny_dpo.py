"""Preference demo: DPO from the SFT demo model on the built-in preference pairs (a function's signature; its own
docstring summary preferred to another function's). No download. From the repository root, after the SFT demo
(configs/tiny_sft.py, which trains workdir/tiny_sft):

    python tools/shard_data.py --builtin-task pref --tokenizer workdir/tokenizer --seq-len 128 --output workdir/pref_shards
    lmtrain eval workdir/tiny_sft --data workdir/pref_shards --split test --out workdir/tiny_sft/eval_pref  # before
    lmtrain train --config=tiny_dpo --workdir=workdir/tiny_dpo
    lmtrain eval workdir/tiny_dpo --data workdir/pref_shards --split test

A row holds one pair (both sequences, 128 tokens together). The reference is a frozen copy of workdir/tiny_sft;
training logs reward_accuracy, margin, chosen_logp and rejected_logp. The hyperparameters are a first choice,
not tuned.
"""

from lmtrain.config import load_config

ARGS = ("runlocal",)  # what --config=NAME:ARG accepts


def get_config(arg: str = ""):
    c = load_config("tiny")  # the default job's model and tokenizer
    c.task.name = "dpo"
    c.task.dpo_beta = 0.1
    c.data.shards_dir = "workdir/pref_shards"  # tools/shard_data.py --builtin-task pref (see the docstring)
    c.train.init_from = "workdir/tiny_sft"  # the SFT demo's WORKDIR: the policy's start and the reference
    c.train.init_from_which = "latest"
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 20
    c.train.steps = 300
    c.train.eval_every = 100
    c.train.eval_batches = 0  # the whole validation split
    c.train.sample_tokens = 0
    c.checkpoint.every = 100
    if arg == "runlocal":  # seconds, for tests: a few steps, small evaluations
        c.train.steps, c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 20, 10, 2, 10
        c.optimizer.warmup_steps = 5
    return c
