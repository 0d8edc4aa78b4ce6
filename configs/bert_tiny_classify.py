"""Fine-tune the MLM-pretrained configs/bert_tiny.py encoder on the built-in classification task (which area
of the standard library a docstring comes from, 6 classes; majority-class baseline about 0.17). From the
repository root, after configs/bert_tiny.py's three commands:

    python tools/shard_data.py --builtin-task classify --tokenizer workdir/bert_tokenizer \
        --output workdir/bert_classify_shards --seq-len 128
    lmtrain train --config=bert_tiny_classify --workdir=workdir/bert_tiny_classify
    lmtrain export workdir/bert_tiny_classify workdir/bert_tiny_classify_hf   # a BertForSequenceClassification

The classifier reads the [CLS] token through the pooler (dense + tanh), as BertForSequenceClassification;
the pooler and the classifier start fresh, the encoder from the pretrained WORKDIR (train.init_from).
"""

from configs.bert_tiny import bert_model
from lmtrain.config import base_config

ARGS = ("runlocal", "smoke")  # what --config=bert_tiny_classify:ARG accepts


def get_config(arg: str = ""):
    c = base_config()
    bert_model(c)  # the same encoder as the pretraining config
    c.task.name = "classify"  # one label per text; model.num_labels comes from the shards' labels
    c.data.source = "shards"
    c.data.shards_dir = "workdir/bert_classify_shards"  # tools/shard_data.py --builtin-task classify (docstring)
    c.data.tokenizer_dir = "workdir/bert_tokenizer"  # the pretraining tokenizer: [CLS] text [SEP]
    c.data.seq_len = 128  # the --seq-len the shards were cut for
    c.data.batch_size = 16
    c.train.init_from = "workdir/bert_tiny"  # the MLM-pretrained WORKDIR (its latest checkpoint)
    c.optimizer.lr = 3e-4  # fine-tuning: a smaller step than pretraining
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 30  # 10% of the steps, as BERT's fine-tuning recipe
    c.train.steps = 300  # about 3.5 passes over the 1361 training examples, as configs/tiny_classify.py
    c.train.log_every = 20
    c.train.eval_every = 50
    c.train.eval_batches = 0  # the whole validation split
    c.train.sample_tokens = 0  # a classifier does not generate
    c.train.early_stopping.metric = "val_accuracy"  # the best checkpoint by accuracy is what export --which best picks
    c.checkpoint.every = 50
    if arg == "runlocal":  # already CPU-sized: a short run
        c.train.steps, c.train.eval_every, c.checkpoint.every = 50, 25, 25
        c.optimizer.warmup_steps = 5
    if arg == "smoke":  # seconds, for tests
        c.train.steps, c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 8, 4, 2, 4
        c.optimizer.warmup_steps = 2
    return c
