"""What the shard writer and the shard reader agree on: file names, the manifest's format tag, the splits,
the ArrayRecord options, the token dtype and the hash that checks a shard."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from lmtrain.data.packing import DataError
from lmtrain.paths import as_path

MANIFEST = "manifest.json"  # written last: a directory without it is unfinished
FORMAT = "lmtrain-shards-v1"
SPLITS = ("train", "validation")  # every shard directory has these; "test" is optional
OPTIONAL_SPLITS = ("test",)
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads a single document
SHARDS_TOKENIZER = "tokenizer"  # a tokenizer extended by shard_data --add-special-tokens, beside the shards


class ShardError(DataError):
    """A shard directory is missing, incomplete or corrupt; the message names the file."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.array_record"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
