"""Span corruption (`task.name='span_corruption'`): T5's pretraining objective for an encoder-decoder
(model.arch='t5') on text shards (or the built-in corpus).

Each packed row of text is one stretch of the stream (T5 too runs over concatenated documents). A share
`task.noise_density` of its tokens, in spans of mean length `task.mean_noise_span_length`, is hidden: the
encoder reads the row with each hidden span replaced by one sentinel token, the decoder writes each span
behind the same sentinel, and both end with EOS (T5's `random_spans_noise_mask` and
`noise_span_to_unique_sentinel`). The sentinels are the tokenizer's `<extra_id_0>`, `<extra_id_1>`, ... (T5's
tokenizers have 100); a tokenizer without them is an error that names it.

The spans are drawn inside the jitted step from the step's RNG, so a resumed run draws the very ones a straight
run does; evaluation draws them from a fixed key, so every evaluation scores the same corruption. Lengths stay
static: the encoder's row is len - noise + spans + 1 tokens, the decoder's noise + spans + 1. The loss is the
cross-entropy over the decoder's tokens (sentinels, hidden tokens, EOS) of every row that holds text.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.data.packing import DataError
from lmtrain.tasks.encdec import EncoderDecoderTask
from lmtrain.tasks.options import SpanCorruptionOptions

SENTINEL = "<extra_id_{}>"


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(hidden tokens, spans) of a row of `length` tokens, as T5 rounds them."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(min(int(round(n_noise / mean_span)), n_noise, length - n_noise), 1)
    return n_noise, n_spans


def _segment_lengths(key, n_items: int, n_segments: int):
    """`n_items` split at random into `n_segments` non-empty runs: their lengths."""
    starts = jax.random.permutation(key, jnp.arange(n_items - 1) < n_segments - 1)
    segment_ids = jnp.cumsum(jnp.concatenate([jnp.zeros(1, bool), starts]))
    return jax.ops.segment_sum(jnp.ones(n_items, jnp.int32), segment_ids, n_segments)


def noise_mask(key, length: int, n_noise: int, n_spans: int):
    """[length] bool: True on hidden tokens, in `n_spans` spans, the row starting with a kept span."""
    k_noise, k_kept = jax.random.split(key)
    runs = jnp.stack([_segment_lengths(k_kept, length - n_noise, n_spans),
                      _segment_lengths(k_noise, n_noise, n_spans)], axis=1).reshape(-1)
    starts = jnp.zeros(length, jnp.int32).at[jnp.cumsum(runs)[:-1]].set(1)
    return jnp.cumsum(starts) % 2 == 1


def _spans_to_sentinels(tokens_L, mask_L, sentinels_K, out_len: int, eos_id: int, pad_id: int):
    """The tokens with each run of `mask_L` replaced by the next sentinel, then EOS, left-aligned in `out_len`:
    (tokens, valid)."""
    prev_L = jnp.concatenate([jnp.zeros(1, bool), mask_L[:-1]])
    first_L = mask_L & ~prev_L
    values_L = jnp.where(first_L, sentinels_K[jnp.maximum(jnp.cumsum(first_L) - 1, 0)], tokens_L)
    keep_L = ~(mask_L & prev_L)
    slot_L = jnp.where(keep_L, jnp.cumsum(keep_L) - 1, out_len)
    out = jnp.full(out_len, pad_id, tokens_L.dtype).at[slot_L].set(values_L, mode="drop")
    n = jnp.sum(keep_L)
    return out.at[n].set(eos_id, mode="drop"), jnp.arange(out_len) <= n


def corrupt_rows(key, tokens_BxL, sentinels_K, noise_density: float, mean_span: float, eos_id: int, pad_id: int):
    """(encoder tokens [B, Se], their mask, targets [B, St], their mask) of span-corrupted rows."""
    length, sentinels_K = tokens_BxL.shape[1], jnp.asarray(sentinels_K)
    n_noise, n_spans = span_counts(length, noise_density, mean_span)
    enc_len, dec_len = length - n_noise + n_spans + 1, n_noise + n_spans + 1

    def one(row_key, tokens_L):
        mask_L = noise_mask(row_key, length, n_noise, n_spans)
        enc, enc_valid = _spans_to_sentinels(tokens_L, mask_L, sentinels_K, enc_len, eos_id, pad_id)
        dec, dec_valid = _spans_to_sentinels(tokens_L, ~mask_L, sentinels_K, dec_len, eos_id, pad_id)
        return enc, enc_valid, dec, dec_valid

    return jax.vmap(one)(jax.random.split(key, tokens_BxL.shape[0]), tokens_BxL)


def sentinel_ids(tokenizer, n_spans: int, where: str) -> np.ndarray:
    """The ids of <extra_id_0> .. <extra_id_{n_spans-1}>; an error names the tokenizer when it lacks them."""
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(SENTINEL.format(i)) for i in range(n_spans)]
    if None in ids:
        have = ids.index(None)
        raise DataError(f"tokenizer {where} has {have} sentinel tokens ({SENTINEL.format(0)}, {SENTINEL.format(1)}, "
                        f"...); span_corruption hides up to {n_spans} spans per row and needs one for each. Use a T5 "
                        f"tokenizer, or train one with tools/train_tokenizer.py --special-tokens {SENTINEL.format(0)} "
                        f"... {SENTINEL.format(n_spans - 1)} (or lower data.seq_len or task.noise_density).")
    return np.asarray(ids, np.int32)


class SpanCorruption(EncoderDecoderTask):
    name = "span_corruption"
    formats = ("text",)
    options = SpanCorruptionOptions  # task.noise_density, task.mean_noise_span_length
    _sentinels: np.ndarray | None = None  # set by make_data, from the run's tokenizer; read when the step traces

    def make_data(self, workdir, data_index: int, data_count: int):
        data = super().make_data(workdir, data_index, data_count)
        t = self.cfg.task
        _, n_spans = span_counts(self.cfg.data.seq_len, t.noise_density, t.mean_noise_span_length)
        where = self.cfg.data.tokenizer_dir or getattr(data.tokenizer, "name_or_path", "") or "of this run"
        self._sentinels = sentinel_ids(data.tokenizer, n_spans, where)
        return data

    def encdec_batch(self, batch: dict, rng=None) -> dict:
        if self._sentinels is None:
            raise RuntimeError("span_corruption: make_data sets the sentinel tokens before a step is traced.")
        m, t = self.cfg.model, self.cfg.task
        key = jax.random.key(self.cfg.train.seed) if rng is None else jax.random.fold_in(rng, 1)
        enc, enc_valid, targets, dec_valid = corrupt_rows(key, batch["inputs"], jnp.asarray(self._sentinels),
                                                          t.noise_density, t.mean_noise_span_length, m.eos_id,
                                                          m.pad_id)
        has_text_Bx1 = jnp.any(batch["segment_ids"] > 0, axis=1, keepdims=True)  # all-padding rows train nothing
        dec_tokens = jnp.concatenate([jnp.full_like(targets[:, :1], m.decoder_start_id), targets[:, :-1]], axis=1)
        return {"enc_tokens": enc, "enc_mask": enc_valid & has_text_Bx1, "dec_tokens": dec_tokens,
                "dec_mask": dec_valid, "targets": targets,
                "loss_mask": (dec_valid & has_text_Bx1).astype(jnp.float32)}
