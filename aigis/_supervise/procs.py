"""The real OS seam of the embedded backend: spawning, signals, /proc tag scans, subreaping."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

#: Every process of a plugin inherits this variable, so descendants that escape the process group
#: with setsid are still found by scanning /proc/*/environ.
TAG_VAR = "AIGIS_PLUGIN_TAG"
_TAG_KEY = b"\0" + TAG_VAR.encode() + b"="
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class Output(Protocol):
    """Where a spawned process's stdout/stderr pipe is handed (a LogSink)."""

    def attach(self, fd: int) -> None: ...


class Tagged(NamedTuple):
    """A live tagged process: its tag and its process group."""

    tag: str
    pgid: int


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat the supervisor needs."""

    state: str
    ppid: int
    pgid: int
    sid: int
    starttime: int  # clock ticks after boot: with the pid, identifies a process across pid reuse


def new_tag(name: str) -> str:
    """A fresh tag for one run of ``name``: ``<name>:<random>``."""
    return f"{name}:{secrets.token_hex(6)}"


def set_child_subreaper(enable: bool = True) -> bool:
    """Make orphaned descendants re-parent to this process instead of init; False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _pids() -> Iterator[int]:
    """Every process id currently listed in /proc."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat; None when the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    rest = data[data.rindex(b")") + 2 :].split()
    return ProcStat(rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]))


def read_tag(pid: int) -> str | None:
    """The AIGIS_PLUGIN_TAG in the process's environment (empty for zombies), or None."""
    try:
        environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    start = environ.find(_TAG_KEY)
    if start < 0:
        return None
    start += len(_TAG_KEY)
    end = environ.find(b"\0", start)
    return environ[start : end if end >= 0 else None].decode(errors="replace")


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


def strays(name: str, marker: str) -> list[int]:
    """Processes of plugin ``name`` left by an earlier core: tagged ``name:…`` and carrying
    ``marker`` (e.g. ``AIGIS_PLUGIN_DIR=/var/lib/aigis/ext/NAME``) in their environment, so
    another AIGIS instance's plugin of the same name is never touched."""
    wanted = b"\0" + marker.encode() + b"\0"
    found = []
    for pid, _tagged in tagged_processes(lambda tag: tag.startswith(name + ":")).items():
        try:
            environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes() + b"\0"
        except OSError:
            continue
        if wanted in environ:
            found.append(pid)
    return found


class Reaper:
    """Reaps orphans re-parented to us as subreaper, but only ones positively known to be ours.

    waitpid(-1) would steal exit statuses from subprocess.run elsewhere in the core (the
    requirements command), so a zombie is reaped only if it is a process once seen tagged (same
    pid and start time, so pid reuse cannot fool it) or it is in the session of a live main process.
    """

    def __init__(self) -> None:
        self.known: dict[int, int] = {}  # pid -> starttime
        self._lock = threading.Lock()  # stop() claims from RPC threads while poll() reaps

    def claim(self, pids: Iterable[int]) -> None:
        """Remember ``pids`` (seen tagged) so each can be reaped once it is our zombie."""
        with self._lock:
            for pid in pids:
                stat = None if pid in self.known else read_stat(pid)
                if stat is not None:
                    self.known[pid] = stat.starttime

    def reap(self, mains: Collection[int]) -> list[tuple[int, int]]:
        """Reap our zombie orphans (not ``mains``, which Popen reaps); return (pid, returncode)."""
        try:
            # Cheap probe first: the /proc scan below runs only when some child is a zombie.
            probe = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            probe = None
        if probe is None:
            return []
        with self._lock:
            return self._reap_locked(mains)

    def _reap_locked(self, mains: Collection[int]) -> list[tuple[int, int]]:
        """One /proc scan: reap our zombies, forget known pids that are gone."""
        me, reaped, alive = os.getpid(), [], {}
        for pid in _pids():
            stat = read_stat(pid)
            if stat is None:
                continue
            alive[pid] = stat.starttime
            if stat.ppid != me or stat.state != "Z" or pid in mains:
                continue
            if self.known.get(pid) == stat.starttime or stat.sid in mains:
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if got:
                    reaped.append((pid, os.waitstatus_to_exitcode(status)))
                    log.debug("reaped: orphan pid %d", pid)
        gone = {pid for pid, _ in reaped}
        self.known = {
            pid: start
            for pid, start in self.known.items()
            if alive.get(pid) == start and pid not in gone
        }
        return reaped


class Os(Protocol):
    """Every OS call the supervisor makes; LocalOs below is the real one."""

    def spawn(self, argv: tuple[str, ...], cwd: Path, env: dict[str, str], output: Output) -> int:
        """Start argv in a new session, env added to os.environ; return its pid."""

    def poll_exit(self, pid: int) -> int | None:
        """Reap a spawned pid: None while it runs, else its returncode (negative: signal)."""

    def kill_group(self, pgid: int, signum: int) -> None:
        """Signal a process group (gone is fine)."""

    def kill(self, pid: int, signum: int) -> None:
        """Signal one process (gone is fine)."""

    def find_tagged(self, tags: Collection[str]) -> dict[int, Tagged]:
        """Live processes carrying one of tags."""

    def find_strays(self, name: str, marker: str) -> list[int]:
        """Processes of ``name`` left by an earlier core (see ``strays``)."""

    def reap_orphans(self) -> list[tuple[int, int]]:
        """Reap zombie orphans of ours."""

    def monotonic(self) -> float:
        """Clock for deadlines."""

    def time(self) -> float:
        """Wall clock for Status."""

    def sleep(self, seconds: float) -> None:
        """Wait while stopping."""


#: Variables that address the core's own service manager: a plugin must never talk to it as
#: if it were the service (a runner would send READY=1 for the core).
SERVICE_ONLY = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
)


def child_environ() -> dict[str, str]:
    """The core's environment minus what belongs to the core's own service."""
    return {k: v for k, v in os.environ.items() if k not in SERVICE_ONLY}


class LocalOs:
    """The OS calls of EmbeddedSupervisor; unit tests replace this with a recording fake."""

    def __init__(self, subreaper: bool = True) -> None:
        if subreaper and not set_child_subreaper(True):
            log.warning("no subreaper: orphaned plugin processes re-parent to init (prctl refused)")
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._reaper = Reaper()

    def spawn(self, argv: tuple[str, ...], cwd: Path, env: dict[str, str], output: Output) -> int:
        """Start ``argv`` in its own session with ``env`` added; its output goes to ``output``."""
        rfd, wfd = os.pipe()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env={**child_environ(), **env},
                stdin=subprocess.DEVNULL,
                stdout=wfd,
                stderr=wfd,
                start_new_session=True,  # own session and process group: killpg reaches it all
            )
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)  # only the child may hold the write end, or the reader never sees EOF
        self._children[proc.pid] = proc
        output.attach(rfd)
        return proc.pid

    def poll_exit(self, pid: int) -> int | None:
        """The returncode of spawned ``pid`` once it exited (negative: killed by that signal)."""
        proc = self._children[pid]
        returncode = proc.poll()
        if returncode is not None:
            del self._children[pid]
        return returncode

    def kill_group(self, pgid: int, signum: int) -> None:
        """Signal a whole process group; a group already gone is fine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    def kill(self, pid: int, signum: int) -> None:
        """Signal one process; one already gone is fine."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def find_strays(self, name: str, marker: str) -> list[int]:
        """Processes of ``name`` left by an earlier core."""
        return strays(name, marker)

    def find_tagged(self, tags: Collection[str]) -> dict[int, Tagged]:
        """Live processes carrying one of ``tags``; each is remembered for reaping."""
        wanted = set(tags)
        if not wanted:
            return {}
        found = tagged_processes(wanted.__contains__)
        self._reaper.claim(found)
        return found

    def reap_orphans(self) -> list[tuple[int, int]]:
        """Reap zombie orphans that are ours."""
        return self._reaper.reap(self._children.keys())

    def monotonic(self) -> float:
        """For deadlines."""
        return time.monotonic()

    def time(self) -> float:
        """For timestamps shown to people."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """Between checks while stopping."""
        time.sleep(seconds)
