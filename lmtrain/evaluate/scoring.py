"""Run a model over an encoded eval set: summed token losses (perplexity, bits per byte) and class predictions.
Every function compiles one shape: batches are filled to a fixed number of rows, so an eval set of any size
compiles once. Greedy generation is the core's (lmtrain.tasks.generation_eval), which the sft task shares.
"""

from __future__ import annotations

import jax
import numpy as np

from lmtrain.data.packing import ExamplePacker, classify_batch, pad_row, rows_dict_to_batch
from lmtrain.model import ModelDef
from lmtrain.tasks.losses import token_loss_sums


def bucket_length(needed: int, cap: int, smallest: int = 16) -> int:
    """The scoring length for data that needs `needed` positions: the next power of two (at least `smallest`),
    never more than `cap` (the model's positions). Buckets bound how many shapes an eval compiles, and short data
    is not padded to a long model's whole window."""
    return min(cap, max(smallest, 1 << max(needed - 1, 0).bit_length()))


def loss_sums(model_def: ModelDef, params: dict, pieces: list[tuple[np.ndarray, np.ndarray]], row_len: int,
              batch_rows: int) -> tuple[float, int]:
    """(summed nats, scored tokens) of the pieces' targets, packed whole into rows of row_len as training packs."""
    vocab = model_def.cfg.vocab_size

    @jax.jit
    def sums(params, batch):
        logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        ce, _, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
        return ce, n

    packer = ExamplePacker(row_len)
    rows = [row for tokens, weights in pieces for row in packer.add(tokens, weights)] + packer.finish()
    nats, tokens = 0.0, 0.0
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        chunk += [pad_row(row_len) for _ in range(batch_rows - len(chunk))]
        ce, n = sums(params, rows_dict_to_batch(chunk))
        nats, tokens = nats + float(ce), tokens + float(n)
    return nats, int(round(tokens))


def class_probabilities(model_def: ModelDef, params: dict, inputs: list[np.ndarray], seq_len: int, batch_rows: int,
                        pad_id: int) -> np.ndarray:
    """[texts, classes] class probabilities of each text (a classifier reads its last real token)."""
    @jax.jit
    def probs_fn(params, batch):
        logits_BxC = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        return jax.nn.softmax(logits_BxC.astype(np.float32), axis=-1)

    probs = []
    for start in range(0, len(inputs), batch_rows):
        chunk = inputs[start:start + batch_rows]
        batch = classify_batch([(x, 0) for x in chunk], seq_len, batch_rows, pad_id)
        probs.append(np.asarray(probs_fn(params, {k: batch[k] for k in ("inputs", "positions", "segment_ids")}))
                     [: len(chunk)])
    return np.concatenate(probs) if probs else np.zeros((0, model_def.cfg.num_labels), np.float32)


