"""text: documents for language modelling, the tokens and the EOS that ends each; packed and split over rows."""

from __future__ import annotations

from lmtrain.data.formats.base import ExampleFormat, register_format


class TextFormat(ExampleFormat):
    name = "text"
    packing = "stream"
    from_corpus = True  # the shard tool's read -> clean -> dedup -> split -> tokenize pipeline makes them


TEXT = register_format(TextFormat())
