"""Which split a document falls into: a hash of its text alone, shared by the shard tool and the built-in source."""

from __future__ import annotations

import xxhash


def is_validation_doc(text: str, val_fraction: float) -> bool:
    """The train/validation split as a function of the document's text alone: the same on every
    re-run, machine and ordering. Both the shard tool and the in-memory built-in source use it."""
    return xxhash.xxh64_intdigest(text.encode("utf-8")) < val_fraction * 2**64
