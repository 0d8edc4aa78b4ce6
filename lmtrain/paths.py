"""One way to name files, local or in cloud storage (`gs://`, `s3://`): `etils.epath`, which Orbax uses too.

Local paths are made absolute (never `resolve()`d through a URI, which would turn `gs://b/x` into the
local `gs:/b/x`); URIs are kept as they are. Every WORKDIR, checkpoint, metrics file, shard directory
and tokenizer goes through `as_path`.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

URI_SCHEMES = ("gs://", "s3://", "az://", "hf://", "memory://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for cloud-storage URIs (gs://, s3://, ...)."""
    return str(path).startswith(URI_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: URIs as given, local paths absolute (symlinks kept)."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Readers see the old file or the new one, never a part.

    Local files go through a temporary name, fsync and rename. Cloud objects are written whole by
    one upload, which the store makes visible atomically.
    """
    path = as_path(path)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
