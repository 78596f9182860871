"""Plugin output: a size-rotated log file per plugin and the console; a write error never kills."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aigis._log import about
from aigis._paths import make_dir
from aigis._settings import LOG_BACKUPS, LOG_MAX_BYTES
from aigis._supervise.base import OutputCounts

LOG_MODE = 0o640  # the core and its group (aigis) may read plugin logs; nobody else
log = logging.getLogger(__name__)

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
            pass  # a closed or broken console must not stop the reader: the file still gets it


def prefix_lines(prefix: bytes, data: bytes) -> bytes:
    """``prefix`` before every line of ``data``; a final line without newline gets one."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(prefix + line + b"\n" for line in lines)


class RotatingFile:
    """An append-only byte file rotated by size to ``<path>.1`` .. ``<path>.<backups>``.

    Unbuffered (os.write on an O_APPEND fd): what a write could not store raises at once and
    nothing is left in a buffer for close() to fail on later.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        try:
            self._fd = self._open()
        except FileNotFoundError:  # the first plugin's log: one mkdir, not one per plugin
            make_dir(path.parent)
            self._fd = self._open()
        self.size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        """The log file, 0640 whatever the umask: plugins print tokens too."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
        os.fchmod(fd, LOG_MODE)
        return fd

    def write(self, data: bytes) -> int:
        """Append ``data`` (whole lines), rotating first if it would not fit; return the bytes
        stored. An OSError (ENOSPC, EIO ...) propagates with ``.stored`` set to what got in."""
        if self.max_bytes > 0 and self.size > 0 and self.size + len(data) > self.max_bytes:
            self.rotate()
        view, stored = memoryview(data), 0
        try:
            while stored < len(data):
                written = os.write(self._fd, view[stored:])
                stored += written
                self.size += written
        except OSError as exc:
            exc.stored = stored  # type: ignore[attr-defined]
            raise
        return stored

    def rotate(self) -> None:
        """Shift backups up by one, dropping the oldest; start an empty file."""
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            os.truncate(self.path, 0)
        fd, self._fd = self._fd, self._open()
        self.size = 0
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        """Close the file; never raises (there is no buffer left to write)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


class Stream:
    """One pipe's bytes (one run of the plugin): holds a partial line until its end or EOF."""

    def __init__(self, sink: LogSink) -> None:
        self._sink, self._pending = sink, b""

    def feed(self, data: bytes) -> None:
        """Bytes read from the pipe: whole lines go to the sink now."""
        pending = self._pending + data
        cut = pending.rfind(b"\n") + 1
        if cut == 0 and len(pending) >= MAX_PARTIAL:
            cut = len(pending)
        if cut:
            self._sink.emit(pending[:cut])
        self._pending = pending[cut:]

    def close(self) -> None:
        """EOF: the last partial line goes too."""
        if self._pending:
            self._sink.emit(self._pending)
            self._pending = b""
        self._sink.stream_closed()


class LogSink:
    """One plugin's output, fed by the event loop: the file byte for byte, the console prefixed.

    A write that fails (a full disk) drops the data, counts it and says so once per episode;
    the pipe keeps being drained, so the plugin never blocks or dies because of its log.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        max_bytes: int = LOG_MAX_BYTES,
        backups: int = LOG_BACKUPS,
        console: Callable[[bytes], None] | None = write_console,
    ) -> None:
        self.name, self.path = name, path
        self._max_bytes, self._backups = max_bytes, backups
        self._closed = False
        self._file: RotatingFile | None = None
        self._retry_at = 0.0  # while the file cannot be opened: when to try again
        self._console = console
        self._prefix = f"{name} | ".encode()
        self._lock = threading.Condition()  # emit (loop thread) vs close/drain (others)
        self._open_streams = 0
        self._open_error: OSError | None = None
        self.dropped = 0  # bytes lost in the current episode of write errors
        self.dropped_total = 0
        self.lines = 0  # lines emitted (a partial line cut at MAX_PARTIAL or EOF counts as one)
        self._open()

    def stream(self) -> Stream:
        """A new pipe's stream: ``drain`` waits until every stream reached EOF."""
        with self._lock:
            self._open_streams += 1
        return Stream(self)

    def stream_closed(self) -> None:
        with self._lock:
            self._open_streams -= 1
            self._lock.notify_all()

    def emit(self, data: bytes) -> None:
        """Write ``data`` byte for byte to the file and, prefixed per line, to the console."""
        with self._lock:
            if self._closed:
                return  # removed while a straggler was still writing
            # as the console shows it: every newline ends a line, and so does the end of data
            self.lines += data.count(b"\n") + (not data.endswith(b"\n"))
            if self._file is None and not self._open():
                self._dropping(len(data), self._open_error or OSError("cannot open"))
            elif self._file is not None:
                self._write(self._file, data)
        if self._console is not None:
            self._console(prefix_lines(self._prefix, data))

    def _open(self) -> bool:
        """Open the file (at most once a second while it fails); True when open."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            self._file = RotatingFile(self.path, self._max_bytes, self._backups)
        except OSError as exc:  # a full or read-only disk: the plugin runs anyway
            self._open_error, self._retry_at = exc, now + 1.0
            return False
        return True

    def _dropping(self, lost: int, exc: OSError) -> None:
        """Count what a failed write lost; the first loss of an episode is said, once."""
        if not self.dropped:
            log.error(
                'dropped: "%s" log output: cannot write %s: %s (the plugin keeps running; '
                "its output is discarded until writing works again)",
                self.name,
                self.path,
                exc.strerror or exc,
                **about(self.name),
            )
        self.dropped += lost
        self.dropped_total += lost

    def _write(self, file: RotatingFile, data: bytes) -> None:
        """One write; a failure starts (or continues) a dropping episode, success ends it."""
        try:
            file.write(data)
        except OSError as exc:
            self._dropping(len(data) - getattr(exc, "stored", 0), exc)
        else:
            if self.dropped:
                log.warning(
                    'resumed: "%s" log output to %s after dropping %d bytes',
                    self.name,
                    self.path,
                    self.dropped,
                    **about(self.name),
                )
                self.dropped = 0

    def counts(self) -> OutputCounts:
        """Lines emitted and bytes dropped so far."""
        with self._lock:
            return OutputCounts(self.lines, self.dropped_total)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every stream to reach EOF; True if all did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._open_streams > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Drain briefly, then close the file; stragglers' output is dropped. Never raises."""
        self.drain(timeout)
        with self._lock:
            file, self._file, self._closed = self._file, None, True
        if file is not None:
            file.close()
        if self.dropped:
            log.warning(
                'dropped: "%s" %d bytes of log output in the end',
                self.name,
                self.dropped,
                **about(self.name),
            )
