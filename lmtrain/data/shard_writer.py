"""The shard writer: the crash-safe protocol that lmtrain.data.shards' reader relies on.

A split's examples go into shard files of about `shard_bytes` of tokens. Each shard is written under a
temporary name, fsynced, hashed (sha256) and renamed into place, so a shard under its final name is
always whole. The shards finished so far are recorded in .progress.json after each one, so a re-run of
the same inputs and options resumes after them (their sha256 is checked); manifest.json is written last,
so a directory without it is unfinished. A gs:// output is staged locally and uploaded, manifest last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lmtrain.data.formats import ExampleFormat, get_format
from lmtrain.data.shard_files import (
    MANIFEST,
    SHARDS_TOKENIZER,
    SPLITS,
    WRITER_OPTIONS,
    ShardError,
    sha256_file,
    shard_name,
)
from lmtrain.paths import as_path, copy_tree, is_remote
from lmtrain.storage.atomic import atomic_write_json, fsync_dir

PROGRESS = ".progress.json"  # finished shards of an unfinished run, rewritten after each shard
KEPT = "kept"  # marks a returned manifest that an earlier run wrote (this run wrote nothing); never saved
RUN_ID = re.compile(r"[0-9a-f]{12}")  # ShardOutput.run_id: the first 12 hex digits of a uuid4


class ShardFileWriter:
    """Write one shard under a temporary name; `finish` fsyncs, hashes and renames it into place.

    A shard under its final name is therefore always complete, whenever the process is killed.
    """

    def __init__(self, path: Path, dtype: np.dtype, tmp_tag: str = "", example_format: ExampleFormat | None = None):
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.format = example_format or get_format("text")
        self.tmp_path = path.with_name(f".{path.name}.tmp-{tmp_tag or os.getpid()}")
        self._writer = ArrayRecordWriter(str(self.tmp_path), WRITER_OPTIONS)
        self.documents = 0
        self.tokens = 0

    def write(self, tokens: np.ndarray, **fields) -> None:
        """One example: its tokens and the other arrays its format stores (a text document: the tokens alone)."""
        self._writer.write(self.format.encode({"tokens": tokens, **fields}, self.dtype))
        self.documents += 1
        self.tokens += len(tokens)

    @property
    def token_bytes(self) -> int:
        return self.tokens * self.dtype.itemsize

    def finish(self) -> dict:
        """Close, fsync and rename; return the manifest entry of the shard."""
        self._writer.close()
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(self.tmp_path)
        size = self.tmp_path.stat().st_size
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return {"file": self.path.name, "documents": self.documents, "tokens": self.tokens, "bytes": size,
                "sha256": digest}

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - best effort on an error path
            pass
        self.tmp_path.unlink(missing_ok=True)


class SplitWriter:
    """Appends documents to one split's shards; skips the documents of shards finished by an earlier run."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_bytes: int, finished: list[dict], claim,
                 run_id: str, example_format: ExampleFormat | None = None):
        self.out, self.split, self.dtype, self.shard_bytes, self.run_id = out, split, dtype, shard_bytes, run_id
        self.format = example_format
        self.finished = list(finished)
        self.skip_documents = sum(s["documents"] for s in finished)
        self.documents_seen = 0
        self._claim = claim  # called before the first file is created in the output directory
        self._current: ShardFileWriter | None = None

    def wants(self) -> bool:
        """Count a document of this split; False when an earlier run already wrote it."""
        self.documents_seen += 1
        return self.documents_seen > self.skip_documents

    def write(self, tokens: np.ndarray, **fields) -> dict | None:
        """Add an example; the manifest entry of the shard it finished, if it did."""
        if self._current is None:
            self._claim()
            self._current = ShardFileWriter(self.out / shard_name(self.split, len(self.finished)), self.dtype,
                                            tmp_tag=self.run_id, example_format=self.format)
        self._current.write(tokens, **fields)
        if self._current.token_bytes >= self.shard_bytes:
            return self.close()
        return None

    def close(self) -> dict | None:
        if self._current is None:
            return None
        entry = self._current.finish()
        self._current = None
        self.finished.append(entry)
        return entry

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()


class ShardOutput:
    """The output directory: what an earlier run left there, and which files this tool may touch.

    Nothing in a directory the tool did not make is ever overwritten or deleted without --force:
    the directory must be empty, or hold a finished or interrupted run of the same inputs and
    options. Temporary files carry a run id that is recorded in .progress.json before the first
    one is created, so a later run deletes only temporaries it can prove are its own.
    """

    def __init__(self, out: Path, fingerprint: dict, force: bool, splits: tuple[str, ...] = SPLITS):
        self.out, self.fingerprint, self.force, self.splits = out, fingerprint, force, splits
        self.run_id = uuid.uuid4().hex[:12]
        if out.exists() and not out.is_dir():
            raise ShardError(f"output {out} is a file, not a directory; choose another --output.")
        manifest = read_json(out / MANIFEST)
        self.complete = manifest if manifest is not None and manifest.get("fingerprint") == fingerprint else None
        progress = read_json(out / PROGRESS)
        self.resumed = progress if progress is not None and progress.get("fingerprint") == fingerprint else None
        self._old = [m for m in (manifest, progress) if m is not None and m is not self.resumed]
        self.claimed = False
        self._finished: dict[str, list[dict]] | None = None
        if self.complete is not None or self.resumed is not None or force:
            return
        if manifest is not None or progress is not None:
            raise ShardError(f"output {out} holds shards made from other inputs or options; delete it, choose another "
                             "--output, or pass --force to replace them (nothing was changed).")
        if out.is_dir() and any(out.iterdir()):
            names = sorted(p.name for p in out.iterdir())
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ShardError(f"output {out} is not empty ({shown}) and is not a shard directory of this tool; choose "
                             "an empty or new --output, or pass --force to write into it (nothing was changed).")

    def finished_shards(self) -> dict[str, list[dict]]:
        """The shards an interrupted run of the same inputs finished, still intact on disk."""
        if self._finished is None:
            shards = (self.resumed or {}).get("shards", {})
            self._finished = {s: _verified_prefix(self.out, shards.get(s, [])) for s in self.splits}
        return self._finished

    def _run_ids(self) -> list[str]:
        return _valid_run_ids(self.resumed or {})

    def claim(self) -> None:
        """Before the first file is written: record this run, clear what earlier runs provably left.

        Called as late as possible, so input errors found before it leave the directory as it was.
        """
        if self.claimed:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        earlier = self._run_ids()
        if self.force:  # replace a run of other options: its manifest first, so it is never taken as complete
            (self.out / MANIFEST).unlink(missing_ok=True)
            for old in self._old:
                for name in _listed_shards(old):
                    unlink_inside(self.out, self.out / name)
                earlier += _valid_run_ids(old)
        for run_id in set(earlier):  # temporaries of killed runs recorded here; anything else is not ours
            for stale in self.out.glob(f".*.tmp-{run_id}"):
                unlink_inside(self.out, stale)
        self._write_progress(self.finished_shards())
        self.claimed = True

    def _write_progress(self, shards: dict[str, list[dict]]) -> None:
        run_ids = [*self._run_ids(), self.run_id]
        atomic_write_json(self.out / PROGRESS, {"fingerprint": self.fingerprint, "shards": shards,
                                                "run_ids": run_ids}, tmp_tag=self.run_id)

    def save_progress(self, writers: dict[str, SplitWriter]) -> None:
        self._write_progress({s: w.finished for s, w in writers.items()})

    def finish(self, manifest: dict) -> None:
        """Write the manifest (last: a directory without it is unfinished) and drop the progress file."""
        try:
            self.claim()
            atomic_write_json(self.out / MANIFEST, manifest, tmp_tag=self.run_id)
        except BaseException:
            self.discard_temporaries()
            raise
        (self.out / PROGRESS).unlink(missing_ok=True)

    def discard_temporaries(self) -> None:
        """On an error: delete this run's half-written files (a JSON file that a full disk cut short)."""
        if self.out.is_dir():
            for stale in self.out.glob(f".*.tmp-{self.run_id}"):
                unlink_inside(self.out, stale)


class RemoteOutput:
    """A gs:// --output: shards are written to a local staging directory (resumable there, with all the
    crash-safety of a local run), then uploaded one object each with manifest.json last, so a reader
    that finds the manifest finds every shard whole. The same refusal rules as for a local output apply."""

    def __init__(self, remote, fingerprint: dict, force: bool, staging_dir: str):
        self.remote, self.fingerprint, self.force = remote, fingerprint, force
        manifest = read_json(remote / MANIFEST)
        self.complete = manifest if manifest is not None and manifest.get("fingerprint") == fingerprint else None
        self._old = manifest if self.complete is None else None
        progress = read_json(remote / PROGRESS)  # a run that writes straight to the prefix (--runner beam)
        self.resumed = progress if progress is not None and progress.get("fingerprint") == fingerprint else None
        if self.complete is None and self.resumed is None and not force and remote.exists():
            names = sorted(p.name for p in remote.iterdir())
            if names:
                what = "holds shards made from other inputs or options" if manifest is not None else (
                    f"is not empty ({', '.join(names[:3])}) and is not a shard directory of this tool")
                raise ShardError(f"output {remote} {what}; choose another --output, or pass --force to replace its "
                                 "shards (nothing was changed).")
        digest = hashlib.sha256(str(remote).encode()).hexdigest()[:16]
        self.stage = Path(staging_dir or Path.home() / ".cache" / "lmtrain" / "shard-staging" / digest)

    def publish(self, manifest: dict) -> None:
        if self._old is not None:  # --force: the old manifest goes first, so no reader mixes old and new shards
            (self.remote / MANIFEST).unlink(missing_ok=True)
            new = set(_listed_shards(manifest))
            for name in _listed_shards(self._old):
                if name not in new:
                    unlink_inside(self.remote, self.remote / name)
        for name in _listed_shards(manifest):
            as_path(self.stage / name).copy(self.remote / name, overwrite=True)
        if (self.stage / SHARDS_TOKENIZER).is_dir():  # --add-special-tokens: the tokenizer the manifest names
            copy_tree(self.stage / SHARDS_TOKENIZER, self.remote / SHARDS_TOKENIZER, last=("tokenizer.json",))
        as_path(self.stage / MANIFEST).copy(self.remote / MANIFEST, overwrite=True)
        shutil.rmtree(self.stage)
        print(f"shard_data: uploaded {len(_listed_shards(manifest))} shards and {MANIFEST} to {self.remote}")


def _listed_shards(record: dict) -> list[str]:
    """Shard file names listed in a manifest ({"splits": {s: {"shards": [...]}}}) or a progress file ({"shards": {s: [...]}})."""
    if isinstance(record.get("splits"), dict):
        lists = [info.get("shards", []) for info in record["splits"].values() if isinstance(info, dict)]
    else:
        lists = [v for v in (record.get("shards") or {}).values() if isinstance(v, list)]
    names = [str(e.get("file", "")) for lst in lists for e in lst if isinstance(e, dict)]
    return [n for n in names if n and Path(n).name == n and not n.startswith(".")]


def _valid_run_ids(record: dict) -> list[str]:
    """The run ids a manifest or progress file records, those of this tool's format only: they go into a
    glob of files to delete, so an edited file's "../x" or "*" must not widen it (such ids are ignored)."""
    ids = record.get("run_ids")
    return [i for i in ids if isinstance(i, str) and RUN_ID.fullmatch(i)] if isinstance(ids, list) else []


def unlink_inside(root, path) -> None:
    """Delete `path` only if it lies directly inside `root` (a local directory or a gs:// prefix)."""
    name = Path(str(path)).name
    if is_remote(str(root)):  # object names: the path must be the prefix, a slash and a plain name
        inside = str(path) == f"{str(root).rstrip('/')}/{name}"
    else:  # a symlink's own entry may go (unlinking it leaves its target), so its directory is what counts
        inside = Path(path).parent.resolve() == Path(root).resolve()
    inside = inside and name not in ("", ".", "..")
    if not inside:
        raise ShardError(f"refusing to delete {path}: it is not a file inside the output {root}.")
    path.unlink(missing_ok=True)


def _verified_prefix(out: Path, shards: list[dict]) -> list[dict]:
    """The finished shards of an earlier run that are still intact on disk, up to the first bad one."""
    good = []
    for entry in shards:
        if not isinstance(entry, dict) or entry.get("file") not in _listed_shards({"shards": {"s": [entry]}}):
            break  # only plain shard names inside the output (an edited progress file may hold others)
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            break
        good.append(entry)
    return good


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def open_output(output: str, fingerprint: dict, splits: tuple[str, ...], force: bool = False, staging_dir: str = ""):
    """(remote or None, ShardOutput, manifest if the output is already complete else None) for the output
    directory `output` (local or gs://) of a run whose content `fingerprint` determines."""
    remote = RemoteOutput(as_path(output), fingerprint, force, staging_dir) if is_remote(output) else None
    if remote is not None and remote.complete is not None:
        print(f"shard_data: {output} is already complete for these inputs and options; nothing to do.")
        return remote, None, {**remote.complete, KEPT: True}
    out = remote.stage if remote is not None else Path(as_path(output))
    # the default staging directory is the tool's own cache: a stale run of other options there is replaced
    output = ShardOutput(out, fingerprint, force or (remote is not None and not staging_dir), splits)
    if output.complete is not None:
        if remote is not None:  # staged completely by a run that was stopped while uploading
            remote.publish(output.complete)
        else:
            print(f"shard_data: {out} is already complete for these inputs and options; nothing to do.")
            return remote, output, {**output.complete, KEPT: True}
        return remote, output, output.complete
    return remote, output, None


