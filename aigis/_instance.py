"""One core per state directory: an exclusive ``flock`` on ``<state_dir>/aigis.lock``, taken before
anything else (a socket bound but not yet listening must never look stale to a second core)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from aigis._errors import AigisError
from aigis._paths import make_dir

LOCK_NAME = "aigis.lock"


class InstanceLock:
    """Held for the core's lifetime; the kernel releases it when the process dies."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AigisError naming the core that holds it."""
        try:
            make_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AigisError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise AigisError(
                f"another AIGIS core is running with state directory {self.path.parent}{who}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the next core start (the file stays: removing it would race a waiting core)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
