"""Supervised fine-tuning (`task.name='sft'`): prompt -> completion, or chat conversations.

The data toolchain (tools/shard_data.py --format sft|chat) stores each example's tokens with a loss mask
that is 1 only on completion (assistant) tokens and the EOS that ends them (--train-on-prompt: every
token). Examples are packed whole with segment masking, so attention never crosses examples. The loss is
the token cross-entropy summed over the masked-in targets and divided by their number over the whole
global batch: gradient accumulation equals one big batch, however the completions' lengths vary.
"""

from __future__ import annotations

from lmtrain.config import ConfigError
from lmtrain.tasks.lm import LanguageModelling


class SupervisedFineTuning(LanguageModelling):
    name = "sft"
    head = "lm"

    def make_data(self, workdir, data_index: int, data_count: int):
        if self.cfg.data.source != "shards":
            raise ConfigError("task.name=sft trains on prompt/completion or chat shards: set data.source=shards and "
                              "make them with tools/shard_data.py --format sft|chat (or --builtin-task sft for the demo).")
        return super().make_data(workdir, data_index, data_count)
