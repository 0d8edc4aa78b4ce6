"""What the encoder-decoder tasks (seq2seq, span_corruption) share: the T5 model they train (model.arch='t5'),
and the loss and evaluation of an encoder input -> decoder target batch.

An encoder-decoder batch holds `enc_tokens`, `enc_mask` (True on encoder tokens), `dec_tokens` (the decoder's
inputs: the targets shifted right behind the decoder start token), `dec_mask` (True on decoder tokens),
`targets` and `loss_mask` (1 where a decoder position predicts a target token), all [B, L]; and, when several
examples share a row, `enc_segments` / `dec_segments` to keep them apart.
"""

from __future__ import annotations

import math

from lmtrain.errors import ConfigError
from lmtrain.model import T5Config, T5ModelDef
from lmtrain.tasks.base import Task
from lmtrain.tasks.losses import token_loss_sums


class EncoderDecoderTask(Task):
    """A task that trains lmtrain.model.encdec's T5; subclasses turn the data's batches into encoder-decoder
    batches with `encdec_batch(batch, rng)` (pure, jitted with the step)."""

    head = "seq2seq"
    eval_kind = None  # lmtrain eval: the generic scoring, this task's eval_step summed over the split
    METRIC_MODES = {"val_loss": "min", "val_perplexity": "min"}

    def model_config(self) -> T5Config:
        if self.cfg.model.get("arch", "transformer") != "t5":
            raise ConfigError(f"task.name={self.name} trains an encoder-decoder: set model.arch='t5' (see "
                              "configs/t5_tiny.py).")
        return T5Config.from_config(self.cfg.model).for_training()

    def encdec_batch(self, batch: dict, rng=None) -> dict:
        raise NotImplementedError

    def loss_fn(self, model_def: T5ModelDef):
        vocab, z_weight = model_def.cfg.vocab_size, self.cfg.train.z_loss

        def loss_fn(params, batch, rng):
            b = self.encdec_batch(batch, rng)
            key = rng if max(model_def.cfg.dropout, model_def.cfg.lora_dropout) > 0 else None  # no bits drawn for none
            logits = _logits(model_def, params, b, key)
            ce_sum, z_sum, n_tokens = token_loss_sums(logits, b["targets"], b["loss_mask"], vocab)
            return ce_sum + z_weight * z_sum, n_tokens, {"loss": ce_sum, "z_loss": z_sum}

        return loss_fn

    def eval_step(self, model_def: T5ModelDef):
        vocab = model_def.cfg.vocab_size

        def eval_step(params, batch):
            b = self.encdec_batch(batch)
            ce_sum, _, n_tokens = token_loss_sums(_logits(model_def, params, b), b["targets"], b["loss_mask"], vocab)
            return {"ce_sum": ce_sum, "tokens": n_tokens}

        return eval_step

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        if not sums.get("tokens"):
            return {}
        val_loss = float(sums["ce_sum"]) / float(sums["tokens"])
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


def _logits(model_def: T5ModelDef, params: dict, b: dict, dropout_key=None):
    return model_def.apply(params, b["enc_tokens"], b["enc_mask"], b["dec_tokens"], b["dec_mask"], dropout_key,
                           b.get("enc_segments"), b.get("dec_segments"))
