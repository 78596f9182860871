"""The process table, read from /proc: a supervisor's descendants, their argv, its RSS, threads."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Proc:
    """One process as /proc showed it; ``start`` (ticks since boot) tells reused pids apart."""

    pid: int
    ppid: int
    pgid: int
    state: str
    start: int
    argv: tuple[str, ...]


def read_proc(pid: int) -> Proc | None:
    """The process ``pid``, or None when it is gone (or its argv is not readable yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields after it start after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    argv = tuple(a.decode(errors="replace") for a in cmdline.split(b"\0")[:-1])
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]), argv)


class ProcessTable:
    """An incremental view of /proc: each ``scan`` reads only the pids it has not seen yet, so
    polling it every few milliseconds stays cheap even with thousands of processes."""

    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}

    def scan(self) -> dict[int, Proc]:
        """Refresh and return pid -> Proc. A process seen before its exec keeps its old argv
        until it is re-read: ``forget`` it to re-read."""
        live = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        for pid in self.procs.keys() - live:
            del self.procs[pid]
        for pid in live - self.procs.keys():
            proc = read_proc(pid)
            if proc is not None:
                self.procs[pid] = proc
        return self.procs

    def forget(self, pids: set[int]) -> None:
        """Drop ``pids`` so the next scan reads them again (their argv may have changed by exec)."""
        for pid in pids:
            self.procs.pop(pid, None)

    def descendants(self, root: int) -> list[Proc]:
        """Live (non-zombie) processes below ``root``, from the last scan."""
        children: dict[int, list[Proc]] = {}
        for proc in self.procs.values():
            children.setdefault(proc.ppid, []).append(proc)
        found, todo = [], [root]
        while todo:
            for proc in children.get(todo.pop(), []):
                found.append(proc)
                todo.append(proc.pid)
        return [p for p in found if p.state != "Z"]


def alive(proc: Proc) -> bool:
    """Whether ``proc`` still runs (not a zombie, and its pid not reused)."""
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and int(fields[19]) == proc.start


@dataclass(frozen=True)
class Footprint:
    """Resident memory and thread count of one process."""

    rss_mib: float
    threads: int


def footprint(pid: int) -> Footprint | None:
    """RSS (MiB) and threads of ``pid`` from /proc/PID/status, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    rss_kib = int(lines["VmRSS"].split()[0])
    return Footprint(rss_kib / 1024, int(lines["Threads"]))


def kill_all(procs: list[Proc]) -> None:
    """SIGKILL each process and its process group (unless it is ours), ignoring the gone."""
    own = os.getpgrp()
    for proc in procs:
        if not alive(proc):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.pgid not in (own, 0, 1):
                os.killpg(proc.pgid, signal.SIGKILL)
            os.kill(proc.pid, signal.SIGKILL)


def with_environ(marker: str) -> list[Proc]:
    """Every process whose environment holds ``marker`` (``KEY=value``): our leftovers."""
    needle = marker.encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read() + b"\0"
        except OSError:
            continue
        if b"\0" + needle in b"\0" + environ:
            proc = read_proc(int(name))
            if proc is not None:
                found.append(proc)
    return found
