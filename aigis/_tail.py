"""Reading the end of a log file and following it across size rotation (``aigisctl logs``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def last_lines(path: Path, count: int, block: int = 64 * 1024) -> list[bytes]:
    """The last ``count`` lines of ``path`` (bytes, newline kept), reading from the end."""
    if count <= 0:
        return []
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= count:
                start = max(0, end - block)
                handle.seek(start)
                data = handle.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    lines = data.splitlines(keepends=True)
    return lines[-count:]


def follow(path: Path, interval: float = 0.25, stop_after: float | None = None) -> Iterator[bytes]:
    """Data appended to ``path`` from this call on; after a rotation, the new file whole.

    The file is opened before this returns, so nothing written afterwards is missed.
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
        handle.seek(0, os.SEEK_END)
    except FileNotFoundError:
        handle = None
    return _follow(path, handle, interval, stop_after)


def _follow(
    path: Path, handle: BinaryIO | None, interval: float, stop_after: float | None
) -> Iterator[bytes]:
    deadline = None if stop_after is None else time.monotonic() + stop_after
    inode = os.fstat(handle.fileno()).st_ino if handle else None
    try:
        while deadline is None or time.monotonic() < deadline:
            if handle is None:
                try:
                    handle = open(path, "rb")  # noqa: SIM115 - kept open across iterations
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
                inode = os.fstat(handle.fileno()).st_ino
            chunk = handle.read()
            if chunk:
                yield chunk
                continue
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is None or current.st_ino != inode or current.st_size < handle.tell():
                handle.close()
                handle = None  # rotated or truncated: read the new file from its start
                continue
            time.sleep(interval)
    finally:
        if handle is not None:
            handle.close()
