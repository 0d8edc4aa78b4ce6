"""Pack tokenized documents into fixed-length rows and turn rows into model batches.

A row holds seq_len + 1 tokens so that inputs and targets are both seq_len long. Every token
carries the id of its document within the row (segment id, 0 for padding) and its position
inside that document, so attention never crosses documents and positions restart per document.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


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
            self._positions.append(np.arange(start, start + take, dtype=np.int32))
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


def rows_to_batch(tokens_BxL1: np.ndarray, segment_ids_BxL1: np.ndarray, positions_BxL1: np.ndarray) -> dict:
    """Shift packed rows into a model batch: predict token t+1 from tokens <= t within the same document.

    The loss mask drops padding and the prediction across a document boundary.
    """
    inputs = tokens_BxL1[:, :-1].astype(np.int32)
    targets = tokens_BxL1[:, 1:].astype(np.int32)
    seg_in, seg_out = segment_ids_BxL1[:, :-1], segment_ids_BxL1[:, 1:]
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32),
        "segment_ids": seg_in.astype(np.int32),
        "positions": positions_BxL1[:, :-1].astype(np.int32),
    }
