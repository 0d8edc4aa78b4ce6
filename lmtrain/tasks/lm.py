"""Language modelling (`task.name='lm'`): predict every next token of packed text.

Batches come from lmtrain.data.pipeline (inputs, targets, loss_mask, segment_ids, positions). The
loss is the summed token cross-entropy (plus `train.z_loss` times the summed (log Z)^2), weighted by
the number of predicted tokens over the whole global batch.
"""

from __future__ import annotations

import math

from lmtrain.model import ModelDef
from lmtrain.tasks.base import Task, dropout_key
from lmtrain.tasks.losses import token_loss_sums


class LanguageModelling(Task):
    name = "lm"
    formats = ("text",)
    head = "lm"
    generates_text = True
    eval_kind = "lm"  # lmtrain eval: perplexity and bits per byte
    METRIC_MODES = {"val_loss": "min", "val_perplexity": "min"}

    def loss_fn(self, model_def: ModelDef):
        vocab, z_weight = model_def.cfg.vocab_size, self.cfg.train.z_loss

        def loss_fn(params, batch, rng):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                     dropout_key(model_def.cfg, rng))
            ce_sum, z_sum, n_tokens = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
            return ce_sum + z_weight * z_sum, n_tokens, {"loss": ce_sum, "z_loss": z_sum}

        return loss_fn

    def eval_step(self, model_def: ModelDef):
        vocab = model_def.cfg.vocab_size

        def eval_step(params, batch):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
            ce_sum, _, n_tokens = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
            return {"ce_sum": ce_sum, "tokens": n_tokens}

        return eval_step

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        if not sums.get("tokens"):
            return {}
        val_loss = float(sums["ce_sum"]) / float(sums["tokens"])
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
