"""Pack tokenized documents into fixed-length rows and turn rows into model batches.

A row holds seq_len + 1 tokens so that inputs and targets are both seq_len long. Every token
carries the id of its segment within the row (segment id, 0 for padding) and its position inside
that segment, so attention never crosses documents. Positions restart at 0 in every row, also for
a document continued from the previous row: a row is a model input of its own (attention never
reaches the previous row), so its positions are always in [0, seq_len) and never index past a
learned position table, on the first pass and after a resume alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from lmtrain.config import ConfigError

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class DataError(ConfigError):
    """Data that cannot be trained on; the message names the source (file, line, shard) and the fix."""


class RowPacker:
    """Greedy streaming packer: documents go in, full rows come out (a document may span rows)."""

    def __init__(self, row_len: int, dtype=np.int32):
        self.row_len = row_len
        self.dtype = dtype
        self._tokens: list[np.ndarray] = []
        self._segments: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._filled = 0
        self._segment = 0

    def add(self, doc_tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Add one document; return the rows it completed."""
        rows = []
        doc_tokens = np.asarray(doc_tokens)
        start = 0
        while start < len(doc_tokens):
            take = min(self.row_len - self._filled, len(doc_tokens) - start)
            self._segment += 1
            self._tokens.append(doc_tokens[start : start + take])
            self._segments.append(np.full(take, self._segment, np.int32))
            self._positions.append(np.arange(take, dtype=np.int32))
            self._filled += take
            start += take
            if self._filled == self.row_len:
                rows.append(self._flush())
        return rows

    def finish(self, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
        """Return the last partial row padded with segment id 0, or nothing if empty."""
        if not self._filled:
            return []
        pad = self.row_len - self._filled
        self._tokens.append(np.full(pad, pad_id))
        self._segments.append(np.zeros(pad, np.int32))
        self._positions.append(np.zeros(pad, np.int32))
        return [self._flush()]

    def _flush(self) -> dict[str, np.ndarray]:
        row = {
            "tokens": np.concatenate(self._tokens).astype(self.dtype),
            "segment_ids": np.concatenate(self._segments),
            "positions": np.concatenate(self._positions),
        }
        self._tokens, self._segments, self._positions = [], [], []
        self._filled, self._segment = 0, 0
        return row


def pack_documents(docs: Iterable[np.ndarray], seq_len: int, keep_partial: bool = False) -> dict[str, np.ndarray]:
    """Pack documents into arrays of shape [rows, seq_len + 1] (tokens, segment_ids, positions)."""
    packer = RowPacker(seq_len + 1)
    rows = []
    for doc in docs:
        rows.extend(packer.add(doc))
    if keep_partial:
        rows.extend(packer.finish())
    if not rows:
        empty = np.zeros((0, seq_len + 1), np.int32)
        return {"tokens": empty, "segment_ids": empty, "positions": empty}
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class ExamplePacker:
    """Greedy packer for fine-tuning examples: whole examples only, never split over rows.

    An example that does not fit in the current row closes it (padded with segment id 0) and starts
    the next, so every example sits in one row with positions 0..n-1, exactly as it would alone: a
    packed batch has the same per-token loss as the examples unpacked. Rows also carry `weights`,
    1 where the token is a training target (the example's loss mask).
    """

    def __init__(self, row_len: int, pad_id: int = 0):
        self.row_len, self.pad_id = row_len, pad_id
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._filled = 0

    def add(self, tokens: np.ndarray, weights: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Add one example; return the rows completed (the one it closed, and its own if it filled it)."""
        if len(tokens) > self.row_len:
            raise ValueError(f"an example of {len(tokens)} tokens does not fit in a row of {self.row_len}.")
        rows = []
        if self._filled + len(tokens) > self.row_len:
            rows.append(self._flush())
        self._parts.append((np.asarray(tokens), np.asarray(weights)))
        self._filled += len(tokens)
        if self._filled == self.row_len:
            rows.append(self._flush())
        return rows

    def finish(self) -> list[dict[str, np.ndarray]]:
        return [self._flush()] if self._parts else []

    def _flush(self) -> dict[str, np.ndarray]:
        pad = self.row_len - self._filled
        row = {
            "tokens": np.concatenate([t for t, _ in self._parts] + [np.full(pad, self.pad_id)]).astype(np.int32),
            "segment_ids": np.concatenate([np.full(len(t), k + 1, np.int32) for k, (t, _) in enumerate(self._parts)]
                                          + [np.zeros(pad, np.int32)]),
            "positions": np.concatenate([np.arange(len(t), dtype=np.int32) for t, _ in self._parts]
                                        + [np.zeros(pad, np.int32)]),
            "weights": np.concatenate([w for _, w in self._parts] + [np.zeros(pad)]).astype(np.float32),
        }
        self._parts, self._filled = [], 0
        return row


def pad_row(row_len: int) -> dict[str, np.ndarray]:
    """An all-padding row (segment id 0, nothing to train on), to fill the last evaluation batch."""
    zeros = np.zeros(row_len, np.int32)
    return {"tokens": zeros, "segment_ids": zeros, "positions": zeros, "weights": np.zeros(row_len, np.float32)}


def rows_to_batch(tokens_BxL1: np.ndarray, segment_ids_BxL1: np.ndarray, positions_BxL1: np.ndarray,
                  weights_BxL1: np.ndarray | None = None) -> dict:
    """Shift packed rows into a model batch: predict token t+1 from tokens <= t within the same document.

    The loss mask drops padding and the prediction across a document boundary, and (fine-tuning)
    every target whose weight is 0, such as a prompt token.
    """
    inputs = tokens_BxL1[:, :-1].astype(np.int32)
    targets = tokens_BxL1[:, 1:].astype(np.int32)
    seg_in, seg_out = segment_ids_BxL1[:, :-1], segment_ids_BxL1[:, 1:]
    loss_mask = ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32)
    if weights_BxL1 is not None:
        loss_mask *= weights_BxL1[:, 1:]
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": seg_in.astype(np.int32),
        "positions": positions_BxL1[:, :-1].astype(np.int32),
    }


def rows_dict_to_batch(rows: list[dict[str, np.ndarray]]) -> dict:
    """rows_to_batch over a list of packer rows (with or without `weights`)."""
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return rows_to_batch(stacked["tokens"], stacked["segment_ids"], stacked["positions"], stacked.get("weights"))


def classify_batch(examples: list[tuple[np.ndarray, int]], seq_len: int, batch_rows: int, pad_id: int = 0) -> dict:
    """A classification batch: one example per row, right-padded; rows past the examples have weight 0.

    inputs, segment_ids (1 real token, 0 padding), positions: [B, L] int32; labels [B] int32;
    weights [B] float32.
    """
    inputs = np.full((batch_rows, seq_len), pad_id, np.int32)
    segment_ids = np.zeros((batch_rows, seq_len), np.int32)
    labels = np.zeros(batch_rows, np.int32)
    weights = np.zeros(batch_rows, np.float32)
    for r, (tokens, label) in enumerate(examples):
        n = min(len(tokens), seq_len)
        inputs[r, :n], segment_ids[r, :n], labels[r], weights[r] = tokens[:n], 1, label, 1.0
    positions = np.where(segment_ids > 0, np.arange(seq_len, dtype=np.int32)[None, :], 0).astype(np.int32)
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions, "labels": labels, "weights": weights}


def token_classify_batch(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_rows: int,
                         pad_id: int = 0) -> dict:
    """A token-classification batch: one example (tokens, per-token label ids, -1 for no target) per row,
    right-padded. inputs, segment_ids, positions, labels: [B, L] int32 (labels 0 where there is no target);
    weights: [B, L] float32, 1 on the tokens whose label is trained and scored."""
    batch = classify_batch([(tokens, 0) for tokens, _ in examples], seq_len, batch_rows, pad_id)
    labels = np.zeros((batch_rows, seq_len), np.int32)
    weights = np.zeros((batch_rows, seq_len), np.float32)
    for r, (_, token_labels) in enumerate(examples):
        n = min(len(token_labels), seq_len)
        labels[r, :n] = np.maximum(token_labels[:n], 0)
        weights[r, :n] = token_labels[:n] >= 0
    return {**batch, "labels": labels, "weights": weights}


def check_data_slice(global_batch_size: int, data_index: int, data_count: int) -> None:
    """A data slice (this host's rows of the global batch, from the batch sharding) must exist and divide the batch."""
    if data_count < 1 or not 0 <= data_index < data_count:
        raise ConfigError(f"data slice {data_index} of {data_count} does not exist (the batch sharding gives "
                          "data_index in [0, data_count)).")
    if global_batch_size % data_count:
        raise ConfigError(f"data.batch_size={global_batch_size} is not divisible by the {data_count} data slices of "
                          f"the batch sharding; use a multiple of {data_count}.")


def check_batch(batch: Mapping[str, np.ndarray], vocab_size: int, max_seq_len: int, source: str) -> None:
    """Raise DataError, naming `source`, when a host batch holds a position >= max_seq_len (or < 0)
    or a token id outside [0, vocab_size).

    Cheap (a min and a max per array), so the trainer can run it on every batch before the device
    sees it: an out-of-range index would otherwise become NaN (learned position table) or silently
    clamp (token embedding) inside jit.
    """
    if "positions" in batch and batch["positions"].size:
        positions = np.asarray(batch["positions"])
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_seq_len:
            bad = lo if lo < 0 else hi
            raise DataError(f"{source}: a batch holds position {bad}, outside [0, {max_seq_len}) "
                            f"(model.max_seq_len={max_seq_len}). Set data.seq_len <= model.max_seq_len, "
                            "or re-make the data with this version of lmtrain.")
    for key in ("inputs", "targets"):  # a classification batch has inputs only
        if key not in batch or not np.asarray(batch[key]).size:
            continue
        ids = np.asarray(batch[key])
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(f"{source}: a batch holds token id {bad} in '{key}', outside [0, {vocab_size}) "
                            f"(model.vocab_size={vocab_size}). The data was tokenized with a larger vocabulary: "
                            "set model.vocab_size to the tokenizer's size, or re-shard with the model's tokenizer.")
