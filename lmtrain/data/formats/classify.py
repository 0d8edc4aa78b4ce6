"""classify: text/label records; a class id (an index into the manifest's labels) and the tokens, one per row."""

from __future__ import annotations

import numpy as np

from lmtrain.data.examples import ClassifyEncoder
from lmtrain.data.formats.base import ExampleFormat, register_format
from lmtrain.data.packing import classify_batch


class ClassifyFormat(ExampleFormat):
    name = "classify"
    packing = "row"
    example_fields = (("label", "<i4"),)
    label_vocab = "example"
    key_field = "text_field"
    records = "text and label fields"

    def make_encoder(self, tokenizer, args):
        return ClassifyEncoder(tokenizer.backend, args.seq_len, args.too_long, args.text_field, args.label_field)

    def arrays(self, example, label_ids) -> dict:
        return {"tokens": example.tokens, "label": label_ids[str(example.label)]}

    def class_ids(self, arrays) -> np.ndarray:
        return np.asarray([arrays["label"]])

    def batch(self, examples, row_len, batch_rows, pad_id) -> dict:
        return classify_batch([(ex["tokens"], ex["label"]) for ex in examples], row_len, batch_rows, pad_id)


CLASSIFY = register_format(ClassifyFormat())
