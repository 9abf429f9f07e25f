"""One training run per output folder: an ``flock`` on ``<out>/.train.lock``.

Why: two trainers given the same ``--out`` both exit 0 and overwrite each other's checkpoint.pt and
metrics.jsonl. The lock is held for the whole run (the kernel drops it when the process dies, so a
killed run never leaves a stale lock); the file records who holds it, so a refused run can say which
process has the folder. ReplayWriter locks a dataset the same way.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".train.lock"


class RunLockError(RuntimeError):
    """The output folder is in use by another run; the message names the holder."""


class RunLock:
    """``with RunLock(out):`` holds ``out``'s run lock (creating ``out``) or raises RunLockError."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunLockError(f"{self.folder}: another training run is using this output folder ({holder}); "
                               f"wait for it to finish or give another --out") from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
