"""Sequence to sequence (`task.name='seq2seq'`): an encoder-decoder (model.arch='t5') learns input -> target from
`--format sft` records: the prompt is the encoder's input, the completion (and the EOS that ends it) the
decoder's target, with teacher forcing. The loss is the cross-entropy of the target tokens only, summed and
divided by their number over the whole global batch, as in the sft task.

Examples are packed whole, not padded: the sft shards already hold each example whole in one row with its
segment id (lmtrain.data.packing.ExamplePacker), and the step reads the two halves out of the row, so short
examples share rows instead of each filling a row of padding (the built-in demo's examples are a fifth of a
row). Per row position t, with m the loss mask (m[t]: token t+1 is a target):

- encoder tokens: the prompt, i.e. the tokens of a segment that are not targets (not m[t-1]);
- decoder tokens: the positions that predict a target (m[t]); the first of them, the prompt's last token,
  becomes the decoder start token, so the decoder reads [start, completion[:-1]] and predicts the completion;
- every attention (encoder, decoder, cross) stays inside its segment. T5's positions are relative and each
  half is contiguous in the row, so a packed example computes exactly what it would alone.

Shards made with --train-on-prompt have no prompt left to encode and are not for this task.
"""

from __future__ import annotations

import jax.numpy as jnp

from lmtrain.errors import ConfigError
from lmtrain.tasks.encdec import EncoderDecoderTask


def _shift_right(x_BxL, fill):
    return jnp.concatenate([jnp.full_like(x_BxL[:, :1], fill), x_BxL[:, :-1]], axis=1)


def packed_seq2seq_batch(batch: dict, decoder_start_id: int) -> dict:
    """The encoder-decoder view of a packed sft batch (inputs, targets, loss_mask, segment_ids [B, L])."""
    segments_BxL = batch["segment_ids"]
    predicts_BxL = batch["loss_mask"] > 0  # the next token is a target
    is_target_BxL = _shift_right(predicts_BxL, False)  # this token is a target (m[t-1]; the mask keeps segments)
    first_BxL = predicts_BxL & ~is_target_BxL  # the prompt's last token: the decoder starts here
    return {
        "enc_tokens": batch["inputs"],
        "enc_mask": (segments_BxL > 0) & ~is_target_BxL,
        "dec_tokens": jnp.where(first_BxL, decoder_start_id, batch["inputs"]),
        "dec_mask": predicts_BxL,
        "targets": batch["targets"],
        "loss_mask": batch["loss_mask"],
        "enc_segments": segments_BxL,
        "dec_segments": segments_BxL,
    }


class SequenceToSequence(EncoderDecoderTask):
    name = "seq2seq"
    formats = ("sft",)

    def encdec_batch(self, batch: dict, rng=None) -> dict:
        return packed_seq2seq_batch(batch, self.cfg.model.decoder_start_id)

    def make_data(self, workdir, data_index: int, data_count: int):
        if self.cfg.data.source != "shards":
            raise ConfigError("task.name=seq2seq trains on prompt/completion shards: set data.source=shards and make "
                              "them with tools/shard_data.py --format sft (or --builtin-task sft for the demo).")
        return super().make_data(workdir, data_index, data_count)
