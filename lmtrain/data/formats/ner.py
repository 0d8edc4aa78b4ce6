"""ner: words with one tag per word (token classification); the tokens and a class id per token, one per row.

A token's class id indexes the manifest's labels; -1 marks a token that is not a target (a word's later
pieces, the special tokens).
"""

from __future__ import annotations

import numpy as np

from lmtrain.data.examples import TokenClassifyEncoder
from lmtrain.data.formats.base import ExampleFormat, register_format
from lmtrain.data.packing import classify_batch


class NerFormat(ExampleFormat):
    name = "ner"
    packing = "row"
    token_fields = (("token_labels", "<i2"),)
    label_vocab = "token"
    key_field = "tokens_field"
    records = "tokens and tags fields"

    def make_encoder(self, tokenizer, args):
        return TokenClassifyEncoder(tokenizer.backend, args.seq_len, args.too_long, args.tokens_field, args.tags_field)

    def arrays(self, example, label_ids) -> dict:
        ids = [-1 if tag is None else label_ids[str(tag)] for tag in example.label]
        return {"tokens": example.tokens, "token_labels": np.asarray(ids, np.int16)}

    def target_tokens(self, arrays) -> int:
        return int((np.asarray(arrays["token_labels"]) >= 0).sum())

    def class_ids(self, arrays) -> np.ndarray:
        labels = np.asarray(arrays["token_labels"])
        return labels[labels >= 0]

    def batch(self, examples, row_len, batch_rows, pad_id) -> dict:
        return per_token_label_batch([(ex["tokens"], ex["token_labels"]) for ex in examples], row_len, batch_rows,
                                    pad_id)


def per_token_label_batch(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_rows: int,
                          pad_id: int = 0) -> dict:
    """A batch of per-token labels: one example (tokens, per-token label ids, -1 for no target) per row,
    right-padded. inputs, segment_ids, positions, labels: [B, L] int32 (labels 0 where there is no target);
    weights: [B, L] float32, 1 on the tokens whose label is trained and scored."""
    batch = classify_batch([(tokens, 0) for tokens, _ in examples], seq_len, batch_rows, pad_id)
    labels_BxL = np.zeros((batch_rows, seq_len), np.int32)
    weights_BxL = np.zeros((batch_rows, seq_len), np.float32)
    for r, (_, token_labels) in enumerate(examples):
        n = min(len(token_labels), seq_len)
        labels_BxL[r, :n] = np.maximum(token_labels[:n], 0)
        weights_BxL[r, :n] = token_labels[:n] >= 0
    return {**batch, "labels": labels_BxL, "weights": weights_BxL}


NER = register_format(NerFormat())
