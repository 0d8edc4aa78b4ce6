"""A full disk during a checkpoint save: how to recognise it, and the process-wide hooks the `lmtrain` commands
that save checkpoints (`train`, `sweep`) install so that it is reported once, in one line.

Nothing here runs at import: the hooks change the whole process (sys/threading excepthooks, log filters), so
the command line installs them, never the library.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import traceback


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is ENOSPC/EDQUOT ("No space left on device")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DiskFullNoise(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records for writes that failed on a full disk."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None and "No space left on device" in record.getMessage():
            return False
        return not (error is not None and is_disk_full(error))


_QUIET = []  # set once per process by quiet_disk_full_noise


def quiet_disk_full_noise() -> None:
    """For the `lmtrain` commands that save checkpoints. A full disk fails every asynchronous write of a save at
    once: Orbax's save thread dies with the error and each of its asyncio write tasks is logged with a traceback
    (hundreds of lines). The save's own error reaches the training thread, which reports it in one line
    (`Checkpointer._raise_if_disk_full`), so these copies are dropped; any other error in those threads prints as
    before. Process-wide hooks, so the command line installs them (once), not the library."""
    if _QUIET:
        return
    _QUIET.append(True)
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and is_disk_full(args.exc_value):
            return
        previous(args)

    threading.excepthook = hook
    for name in ("asyncio", "absl"):  # absl: Orbax's own "save thread failed" records, with the traceback
        logging.getLogger(name).addFilter(_DiskFullNoise())
    # TensorStore's I/O threads then find the save's event loop closed and print that through sys.excepthook.
    previous_sys = sys.excepthook

    def sys_hook(kind, value, tb) -> None:
        frames = traceback.extract_tb(tb)
        late_callback = (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
                         and bool(frames) and frames[0].name == "call_soon_threadsafe")
        if not late_callback:
            previous_sys(kind, value, tb)

    sys.excepthook = sys_hook
