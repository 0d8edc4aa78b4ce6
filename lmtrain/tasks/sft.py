"""Supervised fine-tuning (`task.name='sft'`): prompt -> completion, or chat conversations.

The data toolchain (tools/shard_data.py --format sft|chat) stores each example's tokens with a loss mask
that is 1 only on completion (assistant) tokens and the EOS that ends them (--train-on-prompt: every
token). Examples are packed whole with segment masking, so attention never crosses examples. The loss is
the token cross-entropy summed over the masked-in targets and divided by their number over the whole
global batch: gradient accumulation equals one big batch, however the completions' lengths vary.
"""

from __future__ import annotations

from lmtrain.errors import ConfigError, EvalError
from lmtrain.tasks.generation_eval import ValidationGeneration
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.options import SftOptions


class SupervisedFineTuning(LanguageModelling):
    name = "sft"
    formats = ("sft", "chat")
    head = "lm"
    eval_kind = "sft"  # lmtrain eval: perplexity on the completions, and scores of greedy generations
    METRIC_MODES = {**LanguageModelling.METRIC_MODES, "val_bleu": "max", "val_chrf": "max", "val_rouge_l": "max",
                    "val_exact_match": "max"}
    _generation = None  # a ValidationGeneration, built at the first evaluation

    options = SftOptions  # task.eval_generate_examples

    def extra_eval(self, model_def, params, data) -> dict[str, float]:
        """BLEU, chrF, ROUGE-L and exact match of greedy generations for the first task.eval_generate_examples
        validation examples (0: none), logged as val_bleu, val_chrf, val_rouge_l, val_exact_match."""
        n = self.cfg.task.eval_generate_examples
        if not n:
            return {}
        try:
            if self._generation is None:
                self._generation = ValidationGeneration(self.cfg, model_def, data.tokenizer, n)
            return self._generation(params)
        except EvalError as e:
            raise ConfigError(f"task.eval_generate_examples={n}: {e} Set it to 0 to turn generation off.") from None

    def make_data(self, workdir, data_index: int, data_count: int):
        if self.cfg.data.source != "shards":
            raise ConfigError("task.name=sft trains on prompt/completion or chat shards: set data.source=shards and "
                              "make them with tools/shard_data.py --format sft|chat (or --builtin-task sft for the demo).")
        return super().make_data(workdir, data_index, data_count)
