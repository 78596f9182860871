"""Reading the process table: /proc stat and environment tags, stray scans, reaping our orphans."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

#: Every process of a plugin inherits this variable, so descendants that escape the process group
#: with setsid are still found by scanning /proc/*/environ.
TAG_VAR = "AIGIS_PLUGIN_TAG"
_TAG_KEY = b"\0" + TAG_VAR.encode() + b"="
DIR_VAR = "AIGIS_PLUGIN_DIR"
_DIR_KEY = b"\0" + DIR_VAR.encode() + b"="


class Tagged(NamedTuple):
    """A live tagged process: its tag and its process group."""

    tag: str
    pgid: int


class Stray(NamedTuple):
    """A live tagged process seen before this core spawned anything: an earlier core's."""

    pid: int
    tag: str
    pgid: int
    plugin_dir: str | None  # its AIGIS_PLUGIN_DIR, so another instance's plugins are never hit


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat the supervisor needs."""

    state: str
    ppid: int
    pgid: int
    sid: int
    starttime: int  # clock ticks after boot: with the pid, identifies a process across pid reuse


def _pids() -> Iterator[int]:
    """Every process id currently listed in /proc."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    rest = data[data.rindex(b")") + 2 :].split()
    return ProcStat(rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]))


def _environ(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return b"\0" + file.read()
    except OSError:
        return None


def _value(environ: bytes, key: bytes) -> str | None:
    start = environ.find(key)
    if start < 0:
        return None
    start += len(key)
    end = environ.find(b"\0", start)
    return environ[start : end if end >= 0 else None].decode(errors="replace")


def read_tag(pid: int) -> str | None:
    """The AIGIS_PLUGIN_TAG in the process's environment (empty for zombies), or None."""
    environ = _environ(pid)
    return None if environ is None else _value(environ, _TAG_KEY)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = read_stat(pid)
    return stat is not None and stat.state != "Z"


def tagged_processes(match: Callable[[str], bool] | None = None) -> dict[int, Tagged]:
    """Live processes (not this one) whose tag satisfies ``match`` (any tag when None)."""
    me, found = os.getpid(), {}
    for pid in _pids():
        tag = None if pid == me else read_tag(pid)
        if tag is None or (match is not None and not match(tag)):
            continue
        stat = read_stat(pid)
        if stat is not None and stat.state != "Z":
            found[pid] = Tagged(tag, stat.pgid)
    return found


def stray_processes() -> list[Stray]:
    """Every live tagged process not spawned by this core, in one pass over /proc.

    Called once, before this core spawns anything, it lists what an earlier core left running.
    """
    me, found = os.getpid(), []
    for pid in _pids():
        environ = None if pid == me else _environ(pid)
        tag = None if environ is None else _value(environ, _TAG_KEY)
        if tag is None:
            continue
        stat = read_stat(pid)
        if stat is not None and stat.state != "Z":
            found.append(Stray(pid, tag, stat.pgid, _value(environ or b"", _DIR_KEY)))
    return found


def children_of(pid: int) -> set[int]:
    """Direct children of ``pid`` (of every thread), from /proc/PID/task/*/children."""
    children: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children", "rb") as f:
            children.update(int(child) for child in f.read().split())
    return children


def our_children() -> set[int]:
    """Our direct children (no scan of the whole table)."""
    return children_of(os.getpid())


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and everything below them, walking the children lists."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children_of(pid) - seen)
    return seen


def tagged_among(pids: Iterable[int], wanted: Collection[str]) -> dict[int, Tagged]:
    """Which of ``pids`` are alive and carry one of the ``wanted`` tags."""
    found = {}
    for pid in pids:
        tag = read_tag(pid)
        if tag is None or tag not in wanted:
            continue
        stat = read_stat(pid)
        if stat is not None and stat.state != "Z":
            found[pid] = Tagged(tag, stat.pgid)
    return found


class Reaper:
    """Reaps orphans re-parented to us as subreaper, but only ones positively known to be ours.

    waitpid(-1) would steal exit statuses from subprocess.run elsewhere in the core (the
    requirements command), so a zombie is reaped only if it is in a plugin's process group, or a
    process once seen tagged (same pid and start time, so pid reuse cannot fool it).
    """

    def __init__(self) -> None:
        self.known: dict[int, int] = {}  # pid -> starttime
        self._lock = threading.Lock()

    def claim(self, pids: Iterable[int]) -> None:
        """Remember ``pids`` (seen tagged) so each can be reaped once it is our zombie."""
        with self._lock:
            for pid in pids:
                stat = None if pid in self.known else read_stat(pid)
                if stat is not None:
                    self.known[pid] = stat.starttime

    def reap_group(self, pgid: int, mains: Collection[int]) -> None:
        """Reap our zombies in process group ``pgid``, never one of ``mains`` (Popen's)."""
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        for _ in range(10_000):  # bounded: each pass reaps one zombie or stops
            try:
                info = os.waitid(os.P_PGID, pgid, flags)
            except (ChildProcessError, OSError):
                return
            if info is None or info.si_pid in mains:
                return  # none, or the main first in line: its own exit event reaps it
            self._reap(info.si_pid)

    def sweep(self, mains: Collection[int], groups: Collection[int]) -> None:
        """Reap our zombie orphans in plugin ``groups`` or known as tagged; claim live tagged
        orphans; forget the gone. Reads only our children, never the whole table."""
        for pid in our_children() - set(mains):
            stat = read_stat(pid)
            if stat is None:
                continue
            if stat.state == "Z":
                if stat.pgid in groups or self.known.get(pid) == stat.starttime:
                    self._reap(pid)
            elif pid not in self.known and read_tag(pid) is not None:
                self.claim([pid])
        with self._lock:
            known = dict(self.known)
        for pid, start in known.items():
            stat = read_stat(pid)
            if stat is None or stat.starttime != start:
                with self._lock:
                    self.known.pop(pid, None)

    def _reap(self, pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                log.debug("reaped: orphan pid %d", pid)
                with self._lock:
                    self.known.pop(pid, None)
