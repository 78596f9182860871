"""The embedded backend: AIGIS itself keeps plugin process trees alive when systemd is not used."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aigis._config import Settings
from aigis._errors import NotSupervised, PluginError
from aigis._log import about
from aigis._supervise import policy
from aigis._supervise.base import ACTIVE, LogLocation, ProcessSpec, State, Status
from aigis._supervise.logsink import LogSink, write_console
from aigis._supervise.procs import TAG_VAR, LocalOs, Os, Tagged, new_tag

log = logging.getLogger(__name__)

STEP_MIN, STEP_MAX = 0.02, 0.1  # while stopping: check often at first, less once it drags on
KILL_GRACE = 5.0  # after SIGKILL, how long a process may take to vanish (D state, dying NFS)
SCAN_INTERVAL = 5.0  # how often poll() looks for tagged processes, so orphans can be reaped later
DRAIN_TIMEOUT = 1.0  # after a stop, how long to wait for the last output to reach the log
STOP_WORKERS = 256  # plugins stopped at once by stop_all


@dataclass
class _Run:
    """The mutable record of one supervised plugin; guarded by the supervisor's lock."""

    spec: ProcessSpec
    sink: LogSink
    since: float
    state: State = State.STOPPED
    reason: str = "not started"
    pid: int | None = None
    tag: str | None = None  # fresh per spawn, so leftovers of a run never hit the next one
    restarts: int = 0
    started_at: float | None = None
    started_mono: float = 0.0
    last_exit: str | None = None
    restart_at: float = 0.0
    removing: bool = False
    gave_up: bool = False  # FAILED by the restart policy
    leftovers: dict[str, float] = field(default_factory=dict)  # tag of a dead main -> SIGKILL at
    signalled: set[int] = field(default_factory=set)  # leftover pids already sent SIGTERM


class EmbeddedSupervisor:
    """Implements the Supervisor protocol with a Supervisor-style explicit state machine."""

    name = "embedded"

    def __init__(
        self,
        settings: Settings,
        *,
        console: Callable[[bytes], None] | None = write_console,
        os_: Os | None = None,
    ) -> None:
        self.log_dir = settings.log_dir
        self._log_max_bytes, self._log_backups = settings.log_max_bytes, settings.log_backups
        self._console = console
        self._os: Os = os_ if os_ is not None else LocalOs()
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._halting = False  # set by stop_all: nothing is (re)started afterwards
        self._next_scan = 0.0

    # -- the Supervisor protocol ---------------------------------------------------------------
    def add(self, spec: ProcessSpec) -> None:
        """Register ``spec`` and spawn it (after stopping strays of a crashed earlier core)."""
        self._stop_strays(spec)
        with self._lock:
            self._refuse_if_halting(spec.name)
            if spec.name in self._runs:
                raise PluginError(spec.name, "already supervised (remove it before adding again)")
            sink = LogSink(
                spec.name,
                self.log_dir / f"{spec.name}.log",
                max_bytes=self._log_max_bytes,
                backups=self._log_backups,
                console=self._console,
            )
            run = self._runs[spec.name] = _Run(spec, sink, since=self._os.time())
            self._spawn(run, "starting")

    def start(self, name: str) -> Status:
        """Spawn a plugin that is not running, with a fresh restart count."""
        with self._lock:
            run = self._wait_idle(name)
            if run.state in ACTIVE:
                return self._status(run)
            tidy = run.state is State.BACKOFF or bool(run.leftovers)
        if tidy:
            self.stop(name)  # cancels a pending restart and clears what the last run left behind
        with self._lock:
            run = self._wait_idle(name)
            self._refuse_if_halting(name)
            if run.removing:
                raise PluginError(name, "not started: it is being removed")
            if run.state not in ACTIVE:
                run.restarts = 0
                self._spawn(run, "started by request")
            return self._status(run)

    def restart(self, name: str) -> Status:
        """Stop, then start with a fresh restart count."""
        self.stop(name)
        return self.start(name)

    def stop(self, name: str) -> Status:
        """Stop the plugin's whole process tree (SIGTERM, stop_timeout, SIGKILL); blocks."""
        with self._lock:
            run = self._wait_idle(name)
            owned = run.state in ACTIVE or run.state is State.BACKOFF
            pid = run.pid if run.state in ACTIVE else None
            tags = set(run.leftovers) | ({run.tag} if pid is not None and run.tag else set())
            if not owned and not tags:
                return self._status(run)  # exited/failed/stopped and nothing left behind
            if owned:
                self._set(run, State.STOPPING, "stop requested")
            timeout = run.spec.stop_timeout
        if pid is not None:
            log.info(
                'stopping: "%s" pid %d (SIGTERM, SIGKILL after %gs)',
                name,
                pid,
                timeout,
                **about(name),
            )
        returncode, survivors, killed = self._terminate(name, pid, tags, timeout)
        if pid is not None:
            run.sink.drain(DRAIN_TIMEOUT)  # so the log is complete when stop() returns
        with self._lock:
            if not survivors:
                for tag in tags:
                    run.leftovers.pop(tag, None)
            if owned:
                run.pid = None
                if returncode is not None:
                    run.last_exit = policy.describe_exit(returncode)
            if survivors:
                if owned and run.tag:
                    run.leftovers[run.tag] = 0.0  # poll() keeps sending SIGKILL until they go
                pids = ", ".join(map(str, sorted(survivors)))
                self._set(run, State.FAILED, f"could not stop: pid {pids} survived SIGKILL")
                log.error('failed: "%s" %s', name, run.reason, **about(name))
            elif owned:
                how = f"SIGKILL after {timeout:g}s" if killed else f"last: {run.last_exit}"
                self._set(run, State.STOPPED, f"stopped by request ({how})")
                log.info('stopped: "%s" (%s)', name, how, **about(name))
            return self._status(run)

    def remove(self, name: str) -> None:
        """Stop and forget; the log file stays on disk."""
        with self._lock:
            self._get(name).removing = True  # no restart may sneak in between stop and forget
        self.stop(name)
        with self._lock:
            gone = self._runs.pop(name, None)
        if gone is not None:
            gone.sink.close()

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        """Snapshots, in registration order when ``names`` is None."""
        with self._lock:
            runs = list(self._runs.values()) if names is None else [self._get(n) for n in names]
            return [self._status(run) for run in runs]

    def poll(self) -> None:
        """One main-loop pass: reap, note exits, promote to running, restart after backoff."""
        self._os.reap_orphans()
        with self._lock:
            now = self._os.monotonic()
            for run in self._runs.values():
                self._poll_run(run, now)
            tags = {tag for run in self._runs.values() for tag in run.leftovers}
            if now >= self._next_scan:
                # Seeing live tagged processes now lets their zombies be reaped once orphaned.
                self._next_scan = now + SCAN_INTERVAL
                tags |= {run.tag for run in self._runs.values() if run.state in ACTIVE and run.tag}
        if not tags:
            return
        found = self._os.find_tagged(tags)  # outside the lock: a /proc scan takes milliseconds
        with self._lock:
            self._sweep(tags, found, self._os.monotonic())

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        """Stop each step's plugins at once, the steps in order, then any others (newest
        first, at once); nothing restarts afterwards."""
        with self._lock:
            self._halting = True
            named = {name for step in steps for name in step}
            rest = [name for name in reversed(self._runs) if name not in named]
        for step in [*steps, rest]:
            if not step:
                continue
            with ThreadPoolExecutor(min(len(step), STOP_WORKERS), "aigis-stop") as pool:
                for _ in pool.map(self._stop_quietly, step):
                    pass

    def _stop_quietly(self, name: str) -> None:
        with contextlib.suppress(PluginError):  # unknown or removed meanwhile: nothing to do
            self.stop(name)

    def retire_unknown(self, configured: Iterable[str]) -> list[str]:
        """Nothing to do here: what a crashed core left of a plugin is stopped when that plugin
        is added (a plugin no longer configured is never touched)."""
        return []

    def core_restarting(self) -> bool:
        """Never: without systemd, plugin processes end with the core's pipes."""
        return False

    def log_location(self, name: str) -> LogLocation:
        """``<log_dir>/<name>.log``."""
        return LogLocation(file=self.log_path(name))

    def close(self) -> None:
        """Close the log files (after stop_all: nothing writes to them any more)."""
        with self._lock:
            sinks = [run.sink for run in self._runs.values()]
        for sink in sinks:
            sink.close()

    def log_path(self, name: str) -> Path:
        """``<log_dir>/<name>.log``, whether or not the plugin is supervised now."""
        with self._lock:
            run = self._runs.get(name)
        return run.sink.path if run else self.log_dir / f"{name}.log"

    def mark_ready(self, name: str) -> None:
        """An internal plugin reported ready: running now, without waiting for startsecs."""
        with self._lock:
            run = self._get(name)
            if run.state is State.STARTING:
                self._set(run, State.RUNNING, "reported ready")
                log.info('running: "%s" pid %s (reported ready)', name, run.pid, **about(name))

    # -- transitions (called with the lock held) ------------------------------------------------
    def _stop_strays(self, spec: ProcessSpec) -> None:
        """A core that crashed left this plugin running without its log pipe: stop it, so the
        plugin never runs twice. Only processes with this plugin's directory are touched."""
        plugin_dir = spec.env.get("AIGIS_PLUGIN_DIR")
        if not plugin_dir or spec.name in self._runs:
            return
        pids = self._os.find_strays(spec.name, f"AIGIS_PLUGIN_DIR={plugin_dir}")
        if not pids:
            return
        log.warning(
            'stopping: "%s": %d process(es) left by an earlier core: %s',
            spec.name,
            len(pids),
            " ".join(map(str, pids)),
        )
        for signum, wait in ((signal.SIGTERM, spec.stop_timeout), (signal.SIGKILL, KILL_GRACE)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    self._os.kill(pid, signum)
            deadline = self._os.monotonic() + wait
            while pids and self._os.monotonic() < deadline:
                pids = self._os.find_strays(spec.name, f"AIGIS_PLUGIN_DIR={plugin_dir}")
                if pids:
                    self._os.sleep(STEP_MAX)
            if not pids:
                return
        log.error(
            'failed: "%s": could not stop processes left by an earlier core: %s',
            spec.name,
            " ".join(map(str, pids)),
        )

    def _spawn(self, run: _Run, reason: str) -> None:
        """Spawn a new run with a fresh tag; STARTING, or FAILED if it cannot even be spawned."""
        spec = run.spec
        tag = new_tag(spec.name)
        try:
            pid = self._os.spawn(spec.argv, spec.cwd, {**spec.env, TAG_VAR: tag}, run.sink)
        except OSError as exc:
            run.pid = run.tag = None
            self._set(run, State.FAILED, f"could not spawn: {exc}")
            log.error('failed: "%s" could not spawn: %s', spec.name, exc, **about(spec.name))
            return
        run.pid, run.tag = pid, tag
        run.started_at, run.started_mono = self._os.time(), self._os.monotonic()
        # startsecs 0: counts as running at once (the reason still says why it was spawned).
        self._set(run, State.STARTING if spec.startsecs > 0 else State.RUNNING, reason)
        log.info(
            'spawned: "%s" pid %d: %s', spec.name, pid, " ".join(spec.argv), **about(spec.name)
        )

    def _poll_run(self, run: _Run, now: float) -> None:
        """Advance one plugin's state machine."""
        spec = run.spec
        if run.state in ACTIVE and run.pid is not None:
            returncode = self._os.poll_exit(run.pid)
            if returncode is not None:
                self._exited(run, returncode, now)
            elif run.state is State.STARTING and now - run.started_mono >= spec.startsecs:
                self._set(run, State.RUNNING, run.reason)  # how it started stays true
                log.info('running: "%s" pid %d', spec.name, run.pid, **about(spec.name))
        elif (
            run.state is State.BACKOFF
            and now >= run.restart_at
            and not run.leftovers  # the last run's stragglers go first (ports, lock files)
            and not self._halting
            and not run.removing
        ):
            run.restarts += 1
            self._spawn(run, f"restart {run.restarts}/{spec.restart} after {run.last_exit}")

    def _exited(self, run: _Run, returncode: int, now: float) -> None:
        """The main process exited on its own: ask the policy what follows."""
        name, pid, early = run.spec.name, run.pid, run.state is State.STARTING
        run.last_exit = policy.describe_exit(returncode)
        run.pid = None
        if run.tag:
            run.leftovers[run.tag] = now + run.spec.stop_timeout
        decision = policy.decide(
            returncode=returncode,
            restart_limit=run.spec.restart,
            restarts=run.restarts,
            stop_requested=False,
            base_delay=run.spec.restart_delay,
            max_delay=run.spec.restart_delay_max,
            while_starting=early,
        )
        level, hint = logging.WARNING, " while starting" if early else ""
        if returncode == 0:
            level = logging.INFO
        elif returncode == -signal.SIGKILL:
            level, hint = logging.ERROR, hint + "; perhaps out of memory?"
        log.log(
            level, 'exited: "%s" pid %s with %s%s', name, pid, run.last_exit, hint, **about(name)
        )
        if decision.action is policy.Action.RESTART:
            run.restart_at = now + decision.delay
            log.info('backoff: "%s" %s', name, decision.reason, **about(name))
        elif decision.action is policy.Action.GIVE_UP:
            log.error('gave up: "%s" %s', name, decision.detail, **about(name))
        self._set(run, decision.state, decision.reason)
        run.gave_up = decision.action is policy.Action.GIVE_UP

    def _sweep(self, scanned: set[str], found: dict[int, Tagged], now: float) -> None:
        """Terminate what dead runs left behind: SIGTERM, then SIGKILL after stop_timeout."""
        by_tag: dict[str, list[int]] = {}
        for pid, tagged in found.items():
            by_tag.setdefault(tagged.tag, []).append(pid)
        for run in self._runs.values():
            for tag, kill_at in list(run.leftovers.items()):
                if tag not in scanned:
                    continue  # added after the scan: judged next time
                pids = by_tag.get(tag, [])
                if not pids:
                    del run.leftovers[tag]
                    continue
                late = now >= kill_at
                fresh = [pid for pid in pids if late or pid not in run.signalled]
                for pid in fresh:
                    self._os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                if fresh:
                    name, sig = run.spec.name, "SIGKILL" if late else "SIGTERM"
                    log.warning('leftover: "%s" pid %s (%s)', name, fresh, sig, **about(name))
                run.signalled.update(fresh)
            if not run.leftovers:
                run.signalled.clear()

    def _set(self, run: _Run, state: State, reason: str) -> None:
        """Enter ``state``; waiters on the condition re-check."""
        run.state, run.reason, run.since = state, reason, self._os.time()
        self._changed.notify_all()

    def _get(self, name: str) -> _Run:
        """The run of ``name``; an unknown name is the caller's error, named as such."""
        run = self._runs.get(name)
        if run is None:
            raise NotSupervised(name)
        return run

    def _wait_idle(self, name: str) -> _Run:
        """The run, once no other thread is stopping it (the lock is released while waiting)."""
        run = self._get(name)
        while run.state is State.STOPPING:
            self._changed.wait(0.5)
            run = self._get(name)
        return run

    def _refuse_if_halting(self, name: str) -> None:
        """After stop_all nothing starts again: the daemon is going down."""
        if self._halting:
            raise PluginError(name, "not started: all plugins are being stopped")

    def _status(self, run: _Run) -> Status:
        """An immutable snapshot for callers in other threads."""
        spec = run.spec
        return Status(spec.name, spec.kind, run.state, run.pid, run.restarts, run.since,
                      run.started_at, run.last_exit, run.reason,
                      run.gave_up and run.state is State.FAILED)  # fmt: skip

    # -- stopping (called without the lock) -----------------------------------------------------
    def _terminate(
        self, name: str, pid: int | None, tags: set[str], timeout: float
    ) -> tuple[int | None, set[int], bool]:
        """SIGTERM the tree, SIGKILL at the deadline; return (returncode, survivors, killed)."""
        os_ = self._os
        found = os_.find_tagged(tags)
        if pid is not None:
            os_.kill_group(pid, signal.SIGTERM)
        # Members of the main's group got the killpg; escapees (setsid) are signalled one by one.
        signalled = {p for p, tagged in found.items() if pid is not None and tagged.pgid == pid}
        for p in found.keys() - signalled:
            os_.kill(p, signal.SIGTERM)
        signalled |= found.keys()
        returncode, kill_at, step = None, None, STEP_MIN
        deadline = os_.monotonic() + timeout
        while True:
            if pid is not None and returncode is None:
                returncode = os_.poll_exit(pid)
            os_.reap_orphans()
            main_alive = pid is not None and returncode is None
            found = os_.find_tagged(tags)
            if not main_alive and not found:
                os_.reap_orphans()  # the last ones may have turned zombie since the reap above
                return returncode, set(), kill_at is not None
            now = os_.monotonic()
            if kill_at is None and now >= deadline:
                alive = sorted(found.keys() | ({pid} if main_alive and pid else set()))
                log.warning(
                    'killing: "%s" pid %s alive %gs after SIGTERM (SIGKILL)',
                    name,
                    alive,
                    timeout,
                    **about(name),
                )
                if main_alive and pid is not None:
                    os_.kill_group(pid, signal.SIGKILL)
                for p in found:
                    os_.kill(p, signal.SIGKILL)
                signalled, kill_at = set(found), now + KILL_GRACE
            elif kill_at is not None and now >= kill_at:
                survivors = found.keys() | ({pid} if main_alive and pid else set())
                return returncode, set(survivors), True
            else:
                for p in found.keys() - signalled:  # forked since the last look
                    os_.kill(p, signal.SIGTERM if kill_at is None else signal.SIGKILL)
                signalled |= found.keys()
            os_.sleep(step)
            step = min(step * 1.5, STEP_MAX)
