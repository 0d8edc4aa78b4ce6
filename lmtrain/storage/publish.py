"""Publish a directory whole: write it under a hidden staging name beside OUT, then make it OUT in one step.

Nothing the user had is lost and a half-written directory never looks complete:
- the directory is written into a hidden sibling, `.OUT.NAME-tmp-*`, and renamed to OUT only once whole;
- an old OUT being replaced is moved aside (`.OUT.NAME-old-*`), the new one renamed in, and the old one removed
  only then; a kill between the two renames is undone by `recover`, which moves the old directory back;
- on object stores (gs://, s3://) there is no directory rename: the files are copied from the staging prefix with
  the completion markers last, so a directory without a marker is unfinished.

A marker is a file the tool writes last (an export's config.json): a directory holding one is complete.
Refusing a target whose contents the tool may not replace is the tool's own decision; this module only moves
directories it made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import uuid
from collections.abc import Iterator

from etils import epath

from lmtrain.paths import copy_tree, is_remote


def is_link(path: epath.Path) -> bool:
    return not is_remote(path) and os.path.islink(str(path))


def _remove_sibling(path: epath.Path) -> None:
    """Delete one of OUT's own staging / moved-aside siblings. A link there (an earlier run moved a linked OUT
    aside) is unlinked, never followed: what it points to is not ours to delete; a stray file too."""
    if is_link(path) or path.is_file():
        path.unlink()
    else:
        path.rmtree()


@dataclasses.dataclass(frozen=True)
class Publisher:
    markers: tuple[str, ...]  # files written last: a directory holding one of them is complete
    name: str = "export"  # the hidden siblings' infix, and the word for what is published in notes
    tool: str = "lmtrain export"  # who prints the notes

    @property
    def _staging(self) -> str:
        return f"{self.name}-tmp"

    @property
    def _aside(self) -> str:
        return f"{self.name}-old"

    def _siblings(self, out: epath.Path, kind: str) -> list[epath.Path]:
        if not out.parent.exists():
            return []
        return sorted(p for p in out.parent.glob(f".{out.name}.{kind}-*"))

    @staticmethod
    def _new_sibling(out: epath.Path, kind: str) -> epath.Path:
        return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def is_complete(self, directory: epath.Path) -> bool:
        return any((directory / marker).is_file() for marker in self.markers)

    def staging_dir(self, out: epath.Path) -> epath.Path:
        """A fresh hidden sibling of `out` to write into before it is published whole (OSError if it cannot be made)."""
        staging = self._new_sibling(out, self._staging)
        staging.mkdir(parents=True)
        return staging

    @contextlib.contextmanager
    def staged(self, out: epath.Path, staging: epath.Path) -> Iterator[epath.Path]:
        """Write into `staging` inside the block; `out` becomes it at the end. An error leaves no trace: the staging
        directory is removed and the old `out` is untouched."""
        try:
            yield staging
            self.publish(staging, out)
        except BaseException:
            with contextlib.suppress(OSError):
                if staging.exists():
                    staging.rmtree()
            raise

    def _copy_files(self, source: epath.Path, target: epath.Path) -> None:
        """Copy a directory's files, the markers last (object stores: the write order is the signal)."""
        target.mkdir(parents=True, exist_ok=True)
        copy_tree(source, target, last=self.markers)

    def _remove_files(self, directory: epath.Path) -> None:
        """Delete a directory, the markers first, so that a kill half-way never leaves it looking whole."""
        for marker in self.markers:
            if (directory / marker).exists():
                (directory / marker).unlink()
        directory.rmtree()

    def recover(self, out: epath.Path) -> list[str]:
        """Undo what a killed run left next to `out`; returns what was done, for the user.

        - a staging directory is never published as it is: it is removed;
        - an old directory moved aside is moved back if `out` is not complete, and removed otherwise.
        Only OUT's own hidden siblings (`.OUT.NAME-tmp-*`, `.OUT.NAME-old-*`) are ever deleted, links among them
        as links.
        """
        notes, what = [], self.name
        for staging in self._siblings(out, self._staging):
            _remove_sibling(staging)
            notes.append(f"removed {staging}, left by an interrupted {what}")
        for aside in self._siblings(out, self._aside):
            if self.is_complete(out) or not self.is_complete(aside) or is_link(aside):
                _remove_sibling(aside)
                notes.append(f"removed {aside}, the previous {what} kept until a replacing {what} finished")
                continue
            if out.exists() and not is_remote(out) and any(out.iterdir()):
                # A local OUT is renamed in whole, so an incomplete one holding files is not ours: not ours to delete.
                notes.append(f"kept {aside}, the previous {what} an interrupted {what} with --force moved aside: {out} "
                             "now holds other files, so it was not put back; move it back yourself")
                continue
            if out.exists():
                self._remove_files(out)
            if is_remote(out):
                self._copy_files(aside, out)
                aside.rmtree()
            else:
                os.rename(aside, out)
            notes.append(f"restored the previous {what} to {out} from {aside} (an {what} with --force was interrupted)")
        return notes

    def publish(self, staging: epath.Path, out: epath.Path) -> None:
        """Make the finished `staging` directory `out`, replacing an old one only once the new one is whole."""
        old = out.exists() and any(out.iterdir())
        if is_remote(out):
            aside = self._new_sibling(out, self._aside)
            if old:
                self._copy_files(out, aside)
                self._remove_files(out)
            self._copy_files(staging, out)
            staging.rmtree()
            if old:
                aside.rmtree()
            return
        if not old:
            if out.exists():
                out.rmdir()
            os.rename(staging, out)
            return
        aside = self._new_sibling(out, self._aside)
        os.rename(out, aside)
        os.rename(staging, out)  # a kill between the renames is undone by recover()
        try:  # published: failing to delete the old directory now is a note, not a failure
            _remove_sibling(aside)
        except OSError as e:
            print(f"{self.tool}: note: the new {self.name} is in {out}, but the old one could not be removed from "
                  f"{aside} ({e.strerror or e}); the next {self.name} removes it.", file=sys.stderr)
