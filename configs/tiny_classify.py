"""Classification demo: which area of the standard library (concurrency, devtools, files, formats, math,
network) a docstring comes from, six balanced classes (the majority-class baseline is about 1/6). The
classifier is the default job's model with a fresh head that reads the last real token. No download. From
the repository root, after the README's first command (which trains workdir/tiny with workdir/tokenizer):

    python tools/shard_data.py --builtin-task classify --tokenizer workdir/tokenizer --seq-len 128 \
        --output workdir/classify_shards
    lmtrain train --config=tiny_classify --workdir=workdir/tiny_classify
    lmtrain eval workdir/tiny_classify --data workdir/classify_shards --split test \
        --baseline workdir/tiny_classify --baseline-which start

`--baseline-which start` scores the classifier as training began (the base model and the fresh head, drawn
from train.seed), so the report puts the task metric before and after fine-tuning side by side. The class
list is saved as workdir/tiny_classify/labels.json; the last evaluation's confusion matrix is drawn as
confusion_matrix.png.
"""

from lmtrain.config import load_config

ARGS = ("runlocal",)  # what --config=NAME:ARG accepts


def get_config(arg: str = ""):
    c = load_config("tiny")  # the default job's model and tokenizer, which this run starts from
    c.task.name = "classify"  # text -> one of the classes listed in the shards' manifest
    c.data.shards_dir = "workdir/classify_shards"  # tools/shard_data.py --builtin-task classify (see the docstring)
    c.train.init_from = "workdir/tiny"  # the default job's WORKDIR; the classification head starts fresh
    c.train.init_from_which = "latest"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.train.steps = 300  # about 3.5 passes over the ~1,360 training examples (one per row), minutes on 2 CPU cores
    c.train.eval_every = 50
    c.train.eval_batches = 0  # the whole validation split
    c.train.sample_tokens = 0  # a classifier does not generate
    c.train.early_stopping.metric = "val_accuracy"  # `--which best` and export pick the most accurate checkpoint
    c.checkpoint.every = 50
    if arg == "runlocal":  # seconds, for tests: a few steps, small evaluations
        c.train.steps, c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 20, 10, 2, 10
        c.optimizer.warmup_steps = 5
    return c
