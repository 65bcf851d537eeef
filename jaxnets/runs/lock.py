"""One run per work directory: an OS lock on `<workdir>/.lock`, released when the process dies.

`flock` locks belong to the open file, so the kernel drops them when the process exits
however it exits (`kill -9` included): a crashed run never leaves a stale lock behind. The
file holds the owner's pid and command line, read back only to name the owner in the error.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from jaxnets.runs.workdir import check_workdir_writable

LOCK_FILE = ".lock"
WORKDIR_IN_USE = (
    "work directory {path} is in use by another run (pid {pid}: {command}); two runs in one "
    "directory would overwrite each other's checkpoints and logs. Wait for it to finish, stop "
    "it (kill {pid}), or give this run another workdir=<directory>"
)


class WorkdirLock:
    """Holds the lock of one work directory until `release()` (or process exit).

    Example:
        >>> with WorkdirLock("runs/mine"):    # BlockingIOError if another run holds it
        ...     train()
    """

    def __init__(self, path: str | os.PathLike):
        check_workdir_writable(path)  # creates it, or says why it cannot hold a run
        self.path = Path(path)
        lock_path = self.path / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace").split("\n", 1)
            os.close(fd)
            pid = owner[0].strip() or "unknown"
            command = owner[1].strip() if len(owner) > 1 and owner[1].strip() else "?"
            raise BlockingIOError(
                WORKDIR_IN_USE.format(path=self.path.resolve(), pid=pid, command=command)
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{' '.join(sys.argv)}\n".encode(), 0)
        self._fd: int | None = fd
        _HELD[str(self.path.resolve())] = self

    def release(self) -> None:
        """Releases the lock (idempotent); the lock file stays, it is harmless."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            _HELD.pop(str(self.path.resolve()), None)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# The locks this process holds, by resolved path: a flock is per open file, so a second
# WorkdirLock on a directory this process already holds would refuse its own owner.
_HELD: dict[str, WorkdirLock] = {}


def claim_workdir(path: str | os.PathLike) -> WorkdirLock:
    """This process's lock of `path`: the one it holds already, else a new `WorkdirLock`.

    An experiment claims its directory before loading data (a second run stops at once);
    `run.open_run` claims it again (the same lock) and releases it when the run closes.
    """
    held = _HELD.get(str(Path(path).resolve()))
    return held if held is not None else WorkdirLock(path)
