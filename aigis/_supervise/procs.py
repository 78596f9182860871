"""The real OS seam of the embedded backend: spawning, exit events, signals, timers, fd limits."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

from aigis._supervise.base import ProcessSpec
from aigis._supervise.identity import entered_as_account, prepare_local
from aigis._supervise.proctable import (
    TAG_VAR,
    ProcStat,
    Reaper,
    Stray,
    Tagged,
    alive,
    descendants,
    our_children,
    read_stat,
    read_tag,
    stray_processes,
    tagged_among,
    tagged_processes,
)
from aigis._supervise.reactor import Reactor

__all__ = [
    "FDS_PER_PLUGIN",
    "TAG_VAR",
    "LocalOs",
    "Os",
    "ProcStat",
    "Stray",
    "Tagged",
    "read_stat",
    "read_tag",
    "tagged_processes",
]

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
READ_SIZE = 65536
#: Open files each running plugin costs the core: its output pipe's read end, its pidfd and its
#: log file. (The fd limit also counts sockets, the core's own files and the stop pipes.)
FDS_PER_PLUGIN = 3
FDS_RESERVED = 64  # for the core itself: sockets, its log, imports, the requirements runner


EXIT_POLL = 0.05  # without pidfds only: how often exits are looked for


def _pidfds_work() -> bool:
    """True when this kernel (5.3+) and Python give pidfds."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


class Stream(Protocol):
    """Where one spawned process's output goes (logsink.Stream)."""

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class Output(Protocol):
    """A plugin's output, handing out one stream per spawned process (a LogSink)."""

    def stream(self) -> Stream: ...


class Cancellable(Protocol):
    """A scheduled call (reactor.Timer)."""

    def cancel(self) -> None: ...


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


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
    return soft, soft


class Os(Protocol):
    """Every OS call and event source the supervisor uses; LocalOs below is the real one."""

    def spawn(
        self,
        argv: tuple[str, ...],
        cwd: Path,
        env: dict[str, str],
        output: Output,
        on_exit: Callable[[int], None],
        ids: tuple[int, int] | None = None,
    ) -> int:
        """Start argv in a new process group, env added to os.environ, as ``ids`` (uid, gid; no
        supplementary groups) when given; return its pid. ``on_exit`` gets its returncode
        (negative: signal) once, on the event loop, when it exited."""

    def identity(self, spec: ProcessSpec) -> tuple[int, int] | None:
        """The (uid, gid) ``spec`` runs as, its files handed to it; None: as the core (a core
        that is not root runs every plugin as itself)."""

    def kill_group(self, pgid: int, signum: int) -> None:
        """Signal a process group (gone is fine)."""

    def kill(self, pid: int, signum: int) -> None:
        """Signal one process (gone is fine)."""

    def group_alive(self, pgid: int) -> bool:
        """True while a process (not a zombie of ours) is in group ``pgid``."""

    def alive(self, pid: int) -> bool:
        """True while ``pid`` exists and is not a zombie."""

    def find_tagged(self, tags: Collection[str], roots: Iterable[int] = ()) -> dict[int, Tagged]:
        """Live processes carrying one of tags; ``roots``: running mains whose trees hold them."""

    def find_strays(self) -> list[Stray]:
        """Every live tagged process (one scan), before this core spawned anything."""

    def reap_orphans(self, pgids: Iterable[int]) -> None:
        """Reap zombie orphans of ours: in ``pgids`` and ones seen tagged."""

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` on the event loop once monotonic() >= when."""

    def dispatch(self) -> None:
        """Called by poll(): the real loop needs nothing; a fake delivers its events here."""

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        """Wait on ``cond`` (held) for an event, at most ``timeout`` s."""

    def monotonic(self) -> float:
        """Clock for deadlines."""

    def time(self) -> float:
        """Wall clock for Status."""

    def sleep(self, seconds: float) -> None:
        """Wait while stopping strays."""

    def close(self) -> None:
        """End the event loop."""


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


#: Variables naming the core's own credentials (git's, README "Plugin sources"): a plugin run
#: as another account never gets them.
CORE_CREDENTIALS = ("AIGIS_GIT_CREDENTIALS", "AIGIS_GIT_SSH_KEY", "SSH_AUTH_SOCK", "SSH_AGENT_PID")


def child_environ(other_account: bool = False) -> dict[str, str]:
    """The core's environment minus what belongs to the core's own service, and minus its
    credentials for a process that runs as ``other_account``."""
    dropped = SERVICE_ONLY + CORE_CREDENTIALS if other_account else SERVICE_ONLY
    return {k: v for k, v in os.environ.items() if k not in dropped}


class LocalOs:
    """The OS calls of EmbeddedSupervisor, with one Reactor thread for every event."""

    def __init__(self, subreaper: bool = True) -> None:
        self._subreaper = subreaper and set_child_subreaper(True)
        if subreaper and not self._subreaper:
            log.warning("no subreaper: orphaned plugin processes re-parent to init (prctl refused)")
        before, after = raise_open_files_limit()
        room = max(0, (after - FDS_RESERVED) // FDS_PER_PLUGIN)
        verb = (
            f"raised: open files limit {before} -> {after}"
            if after > before
            else (f"kept: open files limit {after} (the hard limit)")
        )
        log.info("%s: room for about %d plugins (%d fds each)", verb, room, FDS_PER_PLUGIN)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._reaper = Reaper()
        self._reactor = Reactor("aigis-supervise")
        self._warned_dead = False
        # Without pidfds (Linux < 5.3) exits are polled on a timer instead: O(plugins) a look.
        self._pidfds = _pidfds_work()
        self._polled: dict[int, tuple[subprocess.Popen[bytes], Callable[[int], None]]] = {}
        if not self._pidfds:
            log.warning("no pidfd_open: plugin exits are noticed every %gs", EXIT_POLL)

    def spawn(
        self,
        argv: tuple[str, ...],
        cwd: Path,
        env: dict[str, str],
        output: Output,
        on_exit: Callable[[int], None],
        ids: tuple[int, int] | None = None,
    ) -> int:
        """Start ``argv`` in its own process group with ``env`` added; output to ``output``."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        # The child drops to the plugin's account before exec: no supplementary groups (root's
        # would leak), then gid, then uid.
        drop: dict[str, Any] = {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}
        if ids:  # Popen enters cwd before the switch, as root
            argv, cwd = entered_as_account(argv, cwd)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env={**child_environ(other_account=ids is not None), **env},
                stdin=subprocess.DEVNULL,
                stdout=wfd,
                stderr=wfd,
                # Its own process group, so killpg reaches it all. Not its own session: setsid
                # also creates a scheduler autogroup, which made each spawn 3-4 times slower.
                process_group=0,
                **drop,
            )
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)  # only the child may hold the write end, or the reader never sees EOF
        os.set_blocking(rfd, False)
        self._children[proc.pid] = proc
        stream = output.stream()
        readers = [(rfd, lambda: self._pump(rfd, stream))]
        if self._pidfds:
            try:
                pidfd = os.pidfd_open(proc.pid)  # works on a zombie too: no exit is missed
            except OSError:  # EMFILE: never leave a child nobody watches
                os.close(rfd)
                self._children.pop(proc.pid, None)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            readers.append((pidfd, lambda: self._exited(pidfd, proc, on_exit)))
        else:
            self._reactor.call_soon(lambda: self._poll_exits(proc, on_exit))
        self._reactor.add_readers(readers)
        return proc.pid

    def _poll_exits(
        self, proc: subprocess.Popen[bytes] | None = None, on_exit: Callable | None = None
    ) -> None:
        """Loop thread, without pidfds: look at every child; one timer chain for all."""
        if proc is not None and on_exit is not None:
            first = not self._polled
            self._polled[proc.pid] = (proc, on_exit)
            if not first:
                return
        for pid, (child, callback) in list(self._polled.items()):
            returncode = child.poll()
            if returncode is not None:
                del self._polled[pid]
                self._children.pop(pid, None)
                callback(returncode)
        if self._polled:
            self._reactor.call_at(time.monotonic() + EXIT_POLL, self._poll_exits)

    def _pump(self, fd: int, stream: Stream) -> None:
        """Loop thread: one read per readiness, so a flood never starves other plugins."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO and friends: treat as EOF, the pipe is unusable
            log.warning("failed: reading plugin output: %s", exc)
            data = b""
        if data:
            stream.feed(data)
            return
        self._reactor.remove_reader(fd)
        os.close(fd)
        stream.close()

    def _exited(self, pidfd: int, proc: subprocess.Popen[bytes], on_exit: Callable) -> None:
        """Loop thread: the pidfd became readable, so the process exited: reap it, report."""
        self._reactor.remove_reader(pidfd)
        os.close(pidfd)
        returncode = proc.wait()
        self._children.pop(proc.pid, None)
        on_exit(returncode)

    def identity(self, spec: ProcessSpec) -> tuple[int, int] | None:
        """As root: ``spec.user``'s ids, its files handed over (``identity.prepare_local``)."""
        if os.geteuid() != 0:
            return None
        return prepare_local(spec)

    def kill_group(self, pgid: int, signum: int) -> None:
        """Signal a whole process group; a group already gone is fine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    def kill(self, pid: int, signum: int) -> None:
        """Signal one process; one already gone is fine."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def group_alive(self, pgid: int) -> bool:
        """Our zombies in the group are reaped first: they would keep the group alive."""
        self._reaper.reap_group(pgid, self._children.keys())
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def alive(self, pid: int) -> bool:
        """Exists and is not a zombie."""
        return alive(pid)

    def find_tagged(self, tags: Collection[str], roots: Iterable[int] = ()) -> dict[int, Tagged]:
        """Live processes carrying one of ``tags``; each is remembered for reaping.

        As subreaper, whatever a plugin leaves behind stays below us: below ``roots`` (running
        mains) or below an orphan re-parented to us. So only that part of the tree is read,
        not every process on the machine; without subreaper the whole table is scanned."""
        wanted = set(tags)
        if not wanted:
            return {}
        if self._subreaper:
            orphans = our_children() - self._children.keys()
            found = tagged_among(descendants(orphans | set(roots)), wanted)
        else:
            found = tagged_processes(wanted.__contains__)
        self._reaper.claim(pid for pid in found if pid not in self._children)
        return found

    def find_strays(self) -> list[Stray]:
        """Every live tagged process (an earlier core's, when called before any spawn)."""
        return stray_processes()

    def reap_orphans(self, pgids: Iterable[int]) -> None:
        """Reap zombie orphans that are ours (in plugin groups ``pgids``, or seen tagged)."""
        self._reaper.sweep(self._children.keys(), set(pgids))

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        """On the event loop thread."""
        return self._reactor.call_at(when, callback)

    def dispatch(self) -> None:
        """The loop thread does the work; say so loudly if it is gone."""
        if not self._reactor.alive() and not self._warned_dead:
            self._warned_dead = True
            log.critical("failed: the supervisor's event loop ended; plugins are not watched")

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        """Until the loop notifies ``cond`` or ``timeout``."""
        cond.wait(timeout)

    def monotonic(self) -> float:
        """For deadlines."""
        return time.monotonic()

    def time(self) -> float:
        """For timestamps shown to people."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """Between checks while stopping strays."""
        time.sleep(seconds)

    def close(self) -> None:
        """End the event loop (it closes the pipes and pidfds still open)."""
        self._warned_dead = True
        self._reactor.close()
