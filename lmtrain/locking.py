"""One process at a time in a directory: `lmtrain train` in its WORKDIR, `lmtrain sweep` in its sweep directory.

Two runs in one WORKDIR would both train, write the same checkpoints and log every step twice; the second is
refused in one line that names the first (pid, host, since when).

Local directories: an exclusive `flock` on DIR/lmtrain.lock. The OS drops it when its process dies, however it
dies, so a killed run never blocks the next; the file's content names the holder, for the refusal. A file that
still names a holder while its flock is free belongs to a run that died without releasing it (SIGKILL, OOM): the
next run takes it over and says so.

Cloud storage (gs://) has no flock. The lock object is created with the precondition ifGenerationMatch=0, which
the store applies atomically (of two runs, exactly one creates it); tests/gcs_fake.py implements that precondition,
so the tests run this path. The object's metadata names the holder and holds a lease expiry, which a daemon thread
renews every LEASE/4 seconds with a PATCH conditional on the holder's own generation. A lock whose lease expired
(its run was killed or its machine lost), or whose holder is on this host with its pid gone, is taken over: the
DELETE is conditional on the generation that was found stale, so of two runs taking over, one wins.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable

import fsspec

from lmtrain.paths import as_path, is_remote

LOCK_NAME = "lmtrain.lock"
LEASE_SECONDS = 300.0


class DirectoryInUse(Exception):
    """Another live process holds the directory's lock."""


@dataclasses.dataclass
class Holder:
    pid: int
    host: str
    since: float
    expires: float = 0.0  # cloud storage only: the lease's end (seconds since the epoch)

    @classmethod
    def me(cls, lease: float = 0.0) -> Holder:
        now = time.time()
        return cls(os.getpid(), socket.gethostname(), now, now + lease if lease else 0.0)

    @classmethod
    def parse(cls, fields: dict | None) -> Holder | None:
        try:
            return cls(int(fields["pid"]), str(fields["host"]), float(fields["since"]),
                       float(fields.get("expires") or 0.0))
        except (KeyError, TypeError, ValueError):
            return None

    def fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        since = datetime.datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {self.pid} on host {self.host}, since {since}"

    def gone_from_this_host(self) -> bool:
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False


def _parse_text(text: str) -> Holder | None:
    try:
        return Holder.parse(json.loads(text))
    except json.JSONDecodeError:
        return None


class DirLock:
    """`with DirLock(dir, "lmtrain train"):` holds the directory for this process, or raises DirectoryInUse."""

    def __init__(self, directory, what: str, log: Callable[[str], None] = print, lease: float = LEASE_SECONDS,
                 name: str = LOCK_NAME):
        self.directory, self.what, self.log, self.lease = as_path(directory), what, log, lease
        self.path = self.directory / name
        self._fd: int | None = None
        self._generation: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def acquire(self) -> DirLock:
        if is_remote(self.path):
            self._acquire_object()
        else:
            self._acquire_file()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self, holder: Holder | None) -> DirectoryInUse:
        who = holder.describe() if holder else "a process that has not written its name yet"
        return DirectoryInUse(f"{self.directory} is in use by another {self.what} ({who}; lock {self.path}); wait "
                              "for it to finish or stop it, or choose another directory.")

    def _takeover_note(self, holder: Holder, why: str) -> None:
        self.log(f"{self.what}: taking over {self.path} from {holder.describe()}, {why}.")

    # ------------------------------------------------------------------------------------------- local

    def _acquire_file(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_text(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise self._refusal(holder) from None
        previous = _parse_text(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None:  # a release empties the file: this holder died holding it
            self._takeover_note(previous, "which ended without releasing it (killed?)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(Holder.me().fields()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    # ------------------------------------------------------------------------------------------- gs://

    def _fs_key(self) -> tuple[fsspec.AbstractFileSystem, str, str]:
        fs, key = fsspec.core.url_to_fs(str(self.path))
        bucket, _, name = key.partition("/")
        return fs, bucket, name

    def _acquire_object(self) -> None:
        fs, bucket, name = self._fs_key()
        for _ in range(3):  # another run may win each race; three tries settle it
            me = Holder.me(self.lease)
            try:
                fs.pipe_file(f"{bucket}/{name}", json.dumps(me.fields()).encode(), metadata=me.fields(),
                             mode="create")  # ifGenerationMatch=0: only if no lock object exists
            except FileExistsError:
                fs.invalidate_cache()
                try:
                    info = fs.info(f"{bucket}/{name}")
                except FileNotFoundError:
                    continue  # released meanwhile
                holder = Holder.parse(info.get("metadata"))
                if holder is not None and holder.expires > time.time() and not holder.gone_from_this_host():
                    raise self._refusal(holder) from None
                why = "whose process is gone" if holder and holder.gone_from_this_host() else \
                    "whose lease expired (its run was killed or its machine lost)"
                try:  # conditional: only the stale generation goes, never a lock another run just took
                    fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(info["generation"]))
                except (FileNotFoundError, FileExistsError):
                    continue
                if holder is not None:
                    self._takeover_note(holder, why)
                continue
            fs.invalidate_cache()
            self._generation = int(fs.info(f"{bucket}/{name}")["generation"])
            self._renewer = threading.Thread(target=self._renew, args=(me,), daemon=True, name="lmtrain-lock-lease")
            self._renewer.start()
            return
        raise DirectoryInUse(f"{self.directory}: could not take {self.path} (other runs keep taking it); try again.")

    def _renew(self, me: Holder) -> None:
        fs, bucket, name = self._fs_key()
        while not self._stop.wait(self.lease / 4):
            me.expires = time.time() + self.lease
            try:  # a PATCH keeps the generation; it fails if another run replaced an expired lease of ours
                fs.call("PATCH", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(self._generation),
                        json={"metadata": me.fields()})
            except FileExistsError:
                self.log(f"{self.what}: lost {self.path} to another run after its lease expired.")
                return
            except OSError:  # a network error: the next renewal tries again, well within the lease
                continue

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # empty: the next run knows this holder released it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._generation is not None:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join()
            fs, bucket, name = self._fs_key()
            try:
                fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(self._generation))
            except (FileNotFoundError, FileExistsError):
                pass  # already taken over: not ours to delete
            self._generation = None
