"""Where a Beam run of shard_data stages its shards and how it publishes them: the shard writer's protocol
(lmtrain.data.shard_writer) for an output that many workers write at once.

Workers write shards under OUTPUT/.beam-staging (a local or mounted directory, or a gs:// prefix); only this
process, after the pipeline has succeeded, gives them their final names and writes the manifest, last. Until
then the output holds a .progress.json naming the run's inputs and options, so a directory or prefix left by a
failed or cancelled run is never taken as finished, and the same command run again starts the staging anew.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from lmtrain.config import ConfigError
from lmtrain.data.examples import SourceError
from lmtrain.data.shard_files import MANIFEST, shard_name
from lmtrain.data.shard_writer import KEPT, PROGRESS, RemoteOutput, ShardFileWriter, open_output, unlink_inside
from lmtrain.data.shard_writer import _listed_shards as listed_shards
from lmtrain.paths import as_path, is_remote
from lmtrain.storage.atomic import atomic_write_json, fsync_dir

STAGING = ".beam-staging"  # inside the output: the pipeline's shards before they get their final names


def clear(path: str) -> None:
    target = as_path(path)
    if target.exists():
        target.rmtree()


def stage_shard(writer: ShardFileWriter, staging: str) -> dict:
    """Finish a worker's shard (fsynced, hashed) and put it under the staging prefix; its manifest entry."""
    entry = writer.finish()
    if is_remote(staging):
        as_path(writer.path).copy(as_path(staging) / writer.path.name, overwrite=True)
        shutil.rmtree(writer.path.parent)
    return entry


def shard_path(staging: str, name: str) -> Path:
    """Where a worker writes a shard: in the staging directory, or locally first for a gs:// prefix (ArrayRecord
    writes local files)."""
    if is_remote(staging):
        return Path(tempfile.mkdtemp(prefix="lmtrain-beam-")) / name
    return Path(staging) / name


class BeamOutput:
    """The output of a Beam run: `done` (the manifest of an earlier finished run of the same inputs, or None),
    `staging`, and the steps claim -> (pipeline) -> publish -> finish."""

    def __init__(self, output: str, fingerprint: dict, splits: tuple[str, ...], force: bool, staging_dir: str):
        self.fingerprint, self.splits = fingerprint, splits
        self.remote = is_remote(output)
        self.done = None
        if self.remote:
            self.root = as_path(output)
            checked = RemoteOutput(self.root, fingerprint, force, staging_dir)  # the same refusals as locally
            self.done = {**checked.complete, KEPT: True} if checked.complete is not None else None
            self.old = None if checked.complete is not None else checked._old
            if self.done is not None:
                print(f"shard_data: {output} is already complete for these inputs and options; nothing to do.")
        else:
            _, self.local, done = open_output(output, fingerprint, splits, force, staging_dir)
            self.done = done
            self.root = self.local.out
        self.staging = str(self.root / STAGING)

    @contextlib.contextmanager
    def claimed(self):
        """Claim the output for the pipeline; on an input error leave it as it was (the local engine finds such
        errors before its first file is written): what this run made is removed again."""
        existed = self.root.exists()
        before = set(self.root.iterdir()) if existed else set()
        if self.remote:
            atomic_write_json(self.root / PROGRESS, {"fingerprint": self.fingerprint})
        else:
            self.local.claim()
        try:
            yield
        except (SourceError, ConfigError):
            clear(self.staging)
            if self.remote:
                if not before:
                    (self.root / PROGRESS).unlink(missing_ok=True)
            elif not existed:
                shutil.rmtree(self.root, ignore_errors=True)
            elif not before:
                for path in self.root.iterdir():
                    unlink_inside(self.root, path)
            raise

    def publish(self, shards: list[dict]) -> dict[str, list[dict]]:
        """Give the staged shards their final names, split by split in (bucket, corpus position) order."""
        finished: dict[str, list[dict]] = {s: [] for s in self.splits}
        named, count = [], Counter()
        for item in sorted(shards, key=lambda s: (s["split"], s["bucket"], s["entry"]["file"])):
            named.append((item, dict(item["entry"], file=shard_name(item["split"], count[item["split"]]))))
            count[item["split"]] += 1
        if self.remote and self.old is not None:  # --force: the old manifest first, so no reader mixes old and new
            (self.root / MANIFEST).unlink(missing_ok=True)
            new = {entry["file"] for _, entry in named}
            for name in listed_shards(self.old):
                if name not in new:
                    unlink_inside(self.root, self.root / name)
        for item, entry in named:
            split = item["split"]
            staged, final = as_path(self.staging) / item["entry"]["file"], self.root / entry["file"]
            if self.remote:
                staged.copy(final, overwrite=True)
            else:
                os.replace(staged, final)
            finished[split].append(entry)
        if not self.remote:
            fsync_dir(self.root)
        return finished

    def finish(self, tok, manifest: dict) -> None:
        """The extended tokenizer (if any), then the manifest, last; then the staging goes."""
        tok.save_beside(self.root)
        if self.remote:
            atomic_write_json(self.root / MANIFEST, manifest)
            (self.root / PROGRESS).unlink(missing_ok=True)
        else:
            self.local.finish(manifest)
        clear(self.staging)
