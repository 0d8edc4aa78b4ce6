"""Replace one file whole: readers see the old file or the new one, never a part.

Local files are written under a temporary name beside the target (`.NAME.tmp-TAG`), fsynced and renamed over
it, and the directory is fsynced so the rename survives a crash. Cloud objects are written whole by one upload,
which the store makes visible atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid

from lmtrain.paths import as_path, is_remote


def flush_to_disk(f) -> None:
    """Flush an open local file to disk (a no-op for object stores, whose files have no descriptor)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path, tmp_tag: str = ""):
    """Where `path` is written before the rename. A `tmp_tag` (a run id) lets its owner find and delete the
    temporaries a killed run left (`.*.tmp-TAG`); without one the name is unique to this call."""
    return path.parent / f".{path.name}.tmp-{tmp_tag or f'{os.getpid()}-{uuid.uuid4().hex[:8]}'}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes, tmp_tag: str = "") -> None:
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = temporary_name(path, tmp_tag)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, tmp_tag: str = "") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), tmp_tag)


def atomic_write_json(path: str | os.PathLike, obj, tmp_tag: str = "") -> None:
    """`obj` as indented JSON with sorted keys and a final newline (the form of manifests and progress files)."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", tmp_tag)
