"""Reward-model demo: the default job's model with a one-output head learns which of a pair of docstring summaries
belongs to a signature (the built-in preference pairs). No download. From the repository root, after the README's
first command (workdir/tiny) and the pref shards of configs/tiny_dpo.py:

    lmtrain train --config=tiny_reward --workdir=workdir/tiny_reward
    lmtrain eval workdir/tiny_reward --data workdir/pref_shards --split test   # pairwise accuracy
    lmtrain export workdir/tiny_reward workdir/tiny_reward_hf   # *ForSequenceClassification, num_labels=1

The loss is the pairwise Bradley-Terry loss; chance accuracy is 0.5. The hyperparameters are a first choice,
not tuned.
"""

from lmtrain.config import load_config

ARGS = ("runlocal",)  # what --config=NAME:ARG accepts


def get_config(arg: str = ""):
    c = load_config("tiny")  # the default job's model and tokenizer
    c.task.name = "reward"
    c.data.shards_dir = "workdir/pref_shards"
    c.train.init_from = "workdir/tiny"  # the language model's weights; the one-output head starts fresh
    c.train.init_from_which = "latest"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.train.steps = 300
    c.train.eval_every = 100
    c.train.eval_batches = 0
    c.train.sample_tokens = 0
    c.checkpoint.every = 100
    if arg == "runlocal":
        c.train.steps, c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 20, 10, 2, 10
        c.optimizer.warmup_steps = 5
    return c
