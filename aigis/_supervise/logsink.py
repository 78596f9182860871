"""Plugin output: a size-rotated log file per plugin and the console, fed by reader threads."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_PARTIAL = 65536  # a "line" longer than this is written in pieces rather than held forever
_console_lock = threading.Lock()


def write_console(data: bytes) -> None:
    """Write raw bytes to the core's stderr, whole chunks at a time so lines never interleave."""
    stream = sys.stderr
    with _console_lock:
        try:
            stream.flush()  # core log records buffered in the text layer go first
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(data.decode(errors="replace"))
                stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken console must not kill the reader: the file still gets it


def prefix_lines(prefix: bytes, data: bytes) -> bytes:
    """``prefix`` before every line of ``data``; a final line without newline gets one."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(prefix + line + b"\n" for line in lines)


class RotatingFile:
    """An append-only byte file rotated by size to ``<path>.1`` .. ``<path>.<backups>``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - held open across writes, closed in close()
        self.size = self._file.tell()

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines), rotating first if it would not fit."""
        if self.max_bytes > 0 and self.size > 0 and self.size + len(data) > self.max_bytes:
            self.rotate()
        self._file.write(data)
        # Flushed per chunk so `aigisctl logs -f` sees lines as they come.
        self._file.flush()
        self.size += len(data)

    def rotate(self) -> None:
        """Shift backups up by one, dropping the oldest; start an empty file."""
        self._file.close()
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "wb")  # noqa: SIM115 - see __init__
        self.size = 0

    def close(self) -> None:
        """Close the file; later writes are errors."""
        self._file.close()


class LogSink:
    """One plugin's output: every attached pipe is read by its own thread until EOF.

    A thread per pipe means a flooding plugin only ever blocks itself (on its full pipe), never
    the core or another plugin; old runs' pipes stay attached until their last writer is gone.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        max_bytes: int = 10 * 2**20,
        backups: int = 5,
        console: Callable[[bytes], None] | None = write_console,
    ) -> None:
        self.name, self.path = name, path
        self._file: RotatingFile | None = RotatingFile(path, max_bytes, backups)
        self._console = console
        self._prefix = f"{name} | ".encode()
        self._lock = threading.Lock()  # readers of successive runs share the file
        self._readers: list[threading.Thread] = []

    def attach(self, fd: int) -> None:
        """Read ``fd`` (the read end of a process's stdout/stderr pipe) until EOF, then close it."""
        reader = threading.Thread(
            target=self._pump, args=(fd,), name=f"aigis-log-{self.name}", daemon=True
        )
        self._readers = [thread for thread in self._readers if thread.is_alive()] + [reader]
        reader.start()

    def _pump(self, fd: int) -> None:
        """Reader thread: forward whole lines; a partial line waits for its end (or for EOF)."""
        pending = b""
        try:
            while True:
                try:
                    data = os.read(fd, READ_SIZE)
                except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
                    continue
                if not data:
                    break
                pending += data
                cut = pending.rfind(b"\n") + 1
                if cut == 0 and len(pending) >= MAX_PARTIAL:
                    cut = len(pending)
                if cut:
                    self.emit(pending[:cut])
                    pending = pending[cut:]
            if pending:
                self.emit(pending)
        except Exception:  # a reader must never die silently and leave the plugin's pipe full
            log.exception("failed: reading output of %s", self.name, extra={"plugin": self.name})
        finally:
            os.close(fd)

    def emit(self, data: bytes) -> None:
        """Write ``data`` byte for byte to the file and, prefixed per line, to the console."""
        with self._lock:
            if self._file is None:
                return  # removed while a straggler was still writing
            self._file.write(data)
            if self._console is not None:
                self._console(prefix_lines(self._prefix, data))

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every reader to reach EOF; True if all did."""
        deadline = time.monotonic() + timeout
        for reader in list(self._readers):
            reader.join(max(0.0, deadline - time.monotonic()))
        return not any(reader.is_alive() for reader in self._readers)

    def close(self, timeout: float = 1.0) -> None:
        """Drain briefly, then close the file; stragglers' output is dropped."""
        self.drain(timeout)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
