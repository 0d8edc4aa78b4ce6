"""One way to name files, local or in cloud storage (`gs://`, `s3://`): `etils.epath`, which Orbax uses too.

Local paths are made absolute (never `resolve()`d through a URI, which would turn `gs://b/x` into the
local `gs:/b/x`); URIs are kept as they are. Every WORKDIR, checkpoint, metrics file, shard directory
and tokenizer goes through `as_path`.

What differs on cloud storage (each verified against tests/gcs_fake.py, see tests/test_gcs.py):
- A directory is only a name prefix. `mkdir` creates nothing, so an empty directory does not exist.
- Renaming a directory copies and deletes object by object: never use it to publish something whole.
  Orbax does not: on gs:// it writes a step in place and marks it complete with `commit_success.txt`.
- An object is written whole by one upload and replaced atomically; there is no append. gcsfs's
  `open("a")` silently truncates instead, so appends go through `append_text`.
- Libraries that want a local file (tokenizers, matplotlib, ...) get one from `local_dir`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

from etils import epath

URI_SCHEMES = ("gs://", "s3://", "az://", "hf://")  # the schemes etils.epath supports
_ANY_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for cloud-storage URIs (gs://, s3://, ...)."""
    return str(path).startswith(URI_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: URIs as given, local paths absolute (symlinks kept).

    Raises ValueError for a URI scheme epath cannot open, rather than writing to a local `http:/...`.
    """
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    m = _ANY_URI.match(text)
    if m:
        raise ValueError(f"{text}: unsupported storage scheme '{m.group(1)}://'; use a local path or one of "
                         f"{', '.join(URI_SCHEMES)}")
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Add `text` at the end of a file (created if missing), local or in cloud storage.

    Local: one append, flushed and fsynced. Cloud storage cannot append, so the object is read and
    uploaded again with `text` added: readers see the old object or the new one, never a cut line,
    but each call costs the object's size. Batch records (e.g. once per log interval), and keep one
    writer per file.
    """
    path = as_path(path)
    if is_remote(path):
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = ""
        path.write_text(old + text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def files_under(root: str | os.PathLike) -> list[tuple[str, epath.Path]]:
    """(relative posix name, path) of every file under `root`, sorted by name, local or in cloud storage.

    Use this rather than `rglob`: etils.epath refuses recursive `**` patterns on gs://.
    """
    root = as_path(root)
    out = []
    for child in root.iterdir():
        if child.is_dir():
            out += [(f"{child.name}/{rel}", sub) for rel, sub in files_under(child)]
        else:
            out.append((child.name, child))
    return sorted(out, key=lambda f: f[0])


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `src` to the same name under `dst` (local or cloud, either way).

    Files named in `last` (relative names, e.g. a manifest or completion marker) are copied after all
    others, so a reader that waits for them never sees a partial tree. Returns the copied names.
    Existing files of the same name are replaced; others in `dst` are left alone.
    """
    src, dst = as_path(src), as_path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    files = files_under(src)
    ordered = [f for f in files if f[0] not in last] + sorted((f for f in files if f[0] in last),
                                                               key=lambda f: last.index(f[0]))
    for rel, path in ordered:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        path.copy(target, overwrite=True)
    return [rel for rel, _ in ordered]


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local directory holding the files of `path`: `path` itself when local, else a temporary download.

    For libraries that only open local files (tokenizers, Hugging Face). The download is removed on exit;
    changes made to it are not uploaded.
    """
    path = as_path(path)
    if not is_remote(path):
        yield pathlib.Path(path)
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (or holds no files)")
    with tempfile.TemporaryDirectory(prefix="lmtrain-") as tmp:
        copy_tree(path, tmp)
        yield pathlib.Path(tmp)
