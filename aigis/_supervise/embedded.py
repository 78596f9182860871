"""The embedded backend: AIGIS itself keeps plugin process trees alive when systemd is not used.

Event-driven: exits, output and timers arrive on one event loop thread (procs.LocalOs); the
state machine below is the same whichever thread drives it, and never forks in unit tests.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aigis._config import Settings
from aigis._errors import NotSupervised, PluginError
from aigis._log import about
from aigis._supervise import leftovers, policy
from aigis._supervise.base import ACTIVE, LogLocation, ProcessSpec, State, Status
from aigis._supervise.leftovers import Leftover
from aigis._supervise.logsink import LogSink, write_console
from aigis._supervise.procs import TAG_VAR, Cancellable, LocalOs, Os, Stray, new_tag
from aigis._supervise.treestop import KILL_GRACE, STEP_MAX, Tree, stop_strays, stop_trees

__all__ = ["KILL_GRACE", "EmbeddedSupervisor"]

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 1.0  # after a stop, how long to wait for the last output to reach the log
REAP_EVERY = 5.0  # housekeeping: reap zombie orphans (reads our children only, no /proc scan)
ESCAPEE_SCAN_EVERY = 1.0  # after exits, at most one look a second for what left a group
LEFTOVER_STEP = 0.02  # how often a dead run's process group is looked at until it is gone


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
    gen: int = 0  # bumped per spawn: a timer or exit event of an older run finds it changed
    restarts: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    stop_returncode: int | None = None  # the main's exit while STOPPING
    restart_at: float = 0.0
    timer: Cancellable | None = None  # the pending promotion to RUNNING or restart
    removing: bool = False
    gave_up: bool = False  # FAILED by the restart policy
    leftovers: list[Leftover] = field(default_factory=list)
    ticking: bool = False  # a look at the leftovers is scheduled
    ids: tuple[int, int] | None = None  # (uid, gid) it runs as; None: the core's own


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
        self._strays: dict[str, list[Stray]] | None = None  # by name: one scan, before any spawn
        self._scan_tags: set[str] = set()  # tags of dead runs awaiting an escapee scan
        self._scan_timer: Cancellable | None = None
        self._last_scan = float("-inf")
        self._housekeeping: Cancellable | None = None

    # -- the Supervisor protocol ---------------------------------------------------------------
    def add(self, spec: ProcessSpec) -> None:
        """Register ``spec`` and spawn it (after stopping strays of a crashed earlier core)."""
        with self._lock:
            self._refuse_if_halting(spec.name)
            if spec.name in self._runs:
                raise PluginError(spec.name, "already supervised (remove it before adding again)")
        self._stop_strays(spec)
        ids = self._os.identity(spec)  # hands its files over: before the lock, it walks a tree
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
            run = self._runs[spec.name] = _Run(spec, sink, since=self._os.time(), ids=ids)
            self._spawn(run, "started")
            if self._housekeeping is None:
                self._housekeeping = self._os.call_at(self._os.monotonic() + REAP_EVERY, self._reap)

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
            self._get(name)
        self._stop_many([name])
        with self._lock:
            return self._status(self._get(name))

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
        """Nothing to do: exits, restarts and output are handled on the event loop as they
        happen. (A test's fake OS delivers its events here.)"""
        self._os.dispatch()

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        """Stop each step's plugins at once, the steps in order, then any others (at once);
        nothing restarts afterwards."""
        with self._lock:
            self._halting = True
            named = {name for step in steps for name in step}
            rest = [name for name in reversed(self._runs) if name not in named]
        for step in [*steps, rest]:
            if step:
                self._stop_many(step)

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
        """Close the log files, then end the event loop; never raises (after stop_all)."""
        with self._lock:
            sinks = [run.sink for run in self._runs.values()]
            for timer in (self._housekeeping, self._scan_timer):
                if timer is not None:
                    timer.cancel()
        for sink in sinks:
            try:
                sink.close()
            except Exception:  # a log file must never turn a clean shutdown into a crash
                log.exception('failed: closing the log of "%s"', sink.name)
        try:
            self._os.close()
        except Exception:
            log.exception("failed: ending the supervisor's event loop")

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

    # -- strays of an earlier core ------------------------------------------------------------
    def _stop_strays(self, spec: ProcessSpec) -> None:
        """A core that crashed left this plugin running without its log pipe: stop it, so the
        plugin never runs twice. Only processes with this plugin's directory are touched; one
        scan of the process table, before the first spawn, serves every add."""
        plugin_dir = spec.env.get("AIGIS_PLUGIN_DIR")
        if not plugin_dir:
            return
        with self._lock:
            if self._strays is None:
                self._strays = {}
                for stray in self._os.find_strays():
                    self._strays.setdefault(stray.tag.rsplit(":", 1)[0], []).append(stray)
            candidates = self._strays.pop(spec.name, [])
            mine = [s for s in candidates if s.plugin_dir == plugin_dir]
            if not mine:
                return
        stop_strays(self._os, spec.name, mine, spec.stop_timeout)

    # -- transitions (called with the lock held) ------------------------------------------------
    def _spawn(self, run: _Run, reason: str) -> None:
        """Spawn a new run with a fresh tag; STARTING, or FAILED if it cannot even be spawned."""
        spec = run.spec
        tag = new_tag(spec.name)
        run.gen += 1
        gen = run.gen
        env = {**spec.env, TAG_VAR: tag}
        if run.ids is not None and spec.user is not None:
            # Its own account's variables, not root's: HOME is its directory (caches, pip --user).
            env |= {"USER": spec.user, "LOGNAME": spec.user}
            if spec.own_dir is not None:
                env["HOME"] = str(spec.own_dir)
        try:
            pid = self._os.spawn(
                spec.argv,
                spec.cwd,
                env,
                run.sink,
                lambda returncode: self._on_exit(run, gen, returncode),
                ids=run.ids,
            )
        except OSError as exc:
            run.pid = run.tag = None
            self._set(run, State.FAILED, f"could not spawn: {exc}")
            log.error('failed: "%s" could not spawn: %s', spec.name, exc, **about(spec.name))
            return
        run.pid, run.tag, run.stop_returncode = pid, tag, None
        run.started_at = self._os.time()
        # startsecs 0: counts as running at once (the reason still says why it was spawned).
        self._set(run, State.STARTING if spec.startsecs > 0 else State.RUNNING, reason)
        if spec.startsecs > 0:
            when = self._os.monotonic() + spec.startsecs
            run.timer = self._os.call_at(when, lambda: self._promote(run, gen))
        log.info(
            'spawned: "%s" pid %d%s: %s',
            spec.name,
            pid,
            f" as {spec.user} (uid {run.ids[0]})" if run.ids else "",
            " ".join(spec.argv),
            **about(spec.name),
        )

    def _promote(self, run: _Run, gen: int) -> None:
        """Event: startsecs passed and the run is still up: RUNNING."""
        with self._lock:
            if run.gen == gen and run.state is State.STARTING:
                self._set(run, State.RUNNING, run.reason)  # how it started stays true
                log.info('running: "%s" pid %d', run.spec.name, run.pid, **about(run.spec.name))

    def _on_exit(self, run: _Run, gen: int, returncode: int) -> None:
        """Event: the run's main process exited (it is reaped already)."""
        with self._lock:
            if run.gen != gen or run.pid is None:
                return
            pid, run.pid = run.pid, None
            run.last_exit = policy.describe_exit(returncode)
            if run.state is State.STOPPING:  # the stopper decides what follows
                run.stop_returncode = returncode
                self._changed.notify_all()
                return
            self._exited(run, pid, returncode)

    def _exited(self, run: _Run, pid: int, returncode: int) -> None:
        """The main process exited on its own: clear up after it, ask the policy what follows."""
        name, early, now = run.spec.name, run.state is State.STARTING, self._os.monotonic()
        if run.timer is not None:
            run.timer.cancel()
        if self._os.group_alive(pid):  # the rest of its group goes first (ports, lock files)
            self._os.kill_group(pid, signal.SIGTERM)
            run.leftovers.append(Leftover(run.tag or "", {pid}, now + run.spec.stop_timeout))
            self._tick_soon(run, now)
        if run.tag:
            self._want_escapee_scan(run.tag, now)
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
        self._set(run, decision.state, decision.reason)
        run.gave_up = decision.action is policy.Action.GIVE_UP
        if decision.action is policy.Action.RESTART:
            log.info('backoff: "%s" %s', name, decision.reason, **about(name))
            run.restart_at = now + decision.delay
            gen = run.gen
            run.timer = self._os.call_at(run.restart_at, lambda: self._restart_due(run, gen))
        elif decision.action is policy.Action.GIVE_UP:
            log.error('gave up: "%s" %s', name, decision.detail, **about(name))

    def _restart_due(self, run: _Run, gen: int) -> None:
        """Event: the backoff delay passed; restart unless the last run left something."""
        with self._lock:
            if run.gen == gen and not run.leftovers:
                self._restart(run)

    def _restart(self, run: _Run) -> None:
        if run.state is not State.BACKOFF or self._halting or run.removing:
            return
        run.restarts += 1
        self._spawn(run, f"restart {run.restarts}/{run.spec.restart} after {run.last_exit}")

    def _tick_soon(self, run: _Run, now: float) -> None:
        """Look at the run's leftovers shortly (one chain of looks per run)."""
        if not run.ticking:
            run.ticking = True
            self._os.call_at(now + LEFTOVER_STEP, lambda: self._tick_leftovers(run))

    def _tick_leftovers(self, run: _Run) -> None:
        """Event: look at what dead runs left; SIGKILL at their deadline; restart when gone."""
        with self._lock:
            run.ticking = False
            if run.state is State.STOPPING or not run.leftovers:
                return  # a stopper owns them now
            now = self._os.monotonic()
            run.leftovers = leftovers.look(self._os, run.spec.name, run.leftovers, now)
            if run.leftovers:
                self._tick_soon(run, now)
            elif run.state is State.BACKOFF and now >= run.restart_at:
                self._restart(run)

    def _want_escapee_scan(self, tag: str, now: float) -> None:
        """After exits: one scan (at most one a second) finds what left the dead runs' groups."""
        self._scan_tags.add(tag)
        if self._scan_timer is None:
            when = max(now + LEFTOVER_STEP, self._last_scan + ESCAPEE_SCAN_EVERY)
            self._scan_timer = self._os.call_at(when, self._escapee_scan)

    def _escapee_scan(self) -> None:
        """Event: SIGTERM what dead runs left outside their groups (setsid, double fork)."""
        with self._lock:
            tags, self._scan_tags, self._scan_timer = self._scan_tags, set(), None
            self._last_scan = self._os.monotonic()
        found = self._os.find_tagged(tags)  # outside the lock: a scan takes milliseconds
        if not found:
            return
        with self._lock:
            now = self._os.monotonic()
            for pid, tagged in found.items():
                run = self._runs.get(tagged.tag.rsplit(":", 1)[0])
                if run is None or run.state is State.STOPPING:
                    continue  # forgotten meanwhile, or a stopper owns it now
                if tagged.tag == run.tag and run.pid is not None:
                    continue  # the live run's own process (tags are fresh per spawn)
                left = next((x for x in run.leftovers if x.tag == tagged.tag), None)
                if left is None:
                    left = Leftover(tagged.tag, set(), now + run.spec.stop_timeout)
                    run.leftovers.append(left)
                    self._tick_soon(run, now)
                if tagged.pgid not in left.groups and pid not in left.escapees:
                    left.escapees.add(pid)
                    self._os.kill(pid, signal.SIGTERM)
                    name = run.spec.name
                    log.warning(
                        'terminating: "%s" pid %d left by the last run (SIGTERM)',
                        name,
                        pid,
                        **about(name),
                    )

    def _reap(self) -> None:
        """Event, every REAP_EVERY s: reap zombie orphans of ours (cheap: no /proc scan)."""
        with self._lock:
            pgids = [run.pid for run in self._runs.values() if run.pid is not None]
            pgids += [g for run in self._runs.values() for x in run.leftovers for g in x.groups]
        self._os.reap_orphans(pgids)
        with self._lock:
            self._housekeeping = self._os.call_at(self._os.monotonic() + REAP_EVERY, self._reap)

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
            self._os.wait(self._changed, 0.5)
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

    # -- stopping (the wait happens without the lock) -------------------------------------------
    def _stop_many(self, names: Sequence[str]) -> None:
        """SIGTERM the trees of ``names`` at once, each with its own deadline, then SIGKILL."""
        trees: list[tuple[_Run, Tree, bool]] = []
        with self._lock:
            for name in dict.fromkeys(names):
                try:
                    run = self._wait_idle(name)
                except NotSupervised:
                    continue  # unknown, or removed while another thread stopped it
                owned = run.state in ACTIVE or run.state is State.BACKOFF
                if not owned and not run.leftovers:
                    continue  # exited/failed/stopped and nothing left behind
                if run.timer is not None:
                    run.timer.cancel()
                main = run.pid if run.state in ACTIVE else None
                tree = Tree(name, main, set(), set(), run.spec.stop_timeout)
                if main is not None:
                    tree.groups.add(main)
                    tree.tags.add(run.tag or "")
                for left in run.leftovers:
                    tree.groups |= left.groups
                    tree.escapees |= left.escapees
                    tree.tags.add(left.tag)
                if owned:
                    self._set(run, State.STOPPING, "stop requested")
                    if main is not None:
                        log.info(
                            'stopping: "%s" pid %d (SIGTERM, SIGKILL after %gs)',
                            name,
                            main,
                            run.spec.stop_timeout,
                            **about(name),
                        )
                trees.append((run, tree, owned))
        if not trees:
            return
        groups = {pgid for _, tree, _ in trees for pgid in tree.groups}
        stop_trees(self._os, [tree for _, tree, _ in trees], self._main_gone, self._wait_event)
        self._os.reap_orphans(groups)  # what died as our orphan goes now, not at the next sweep
        deadline = self._os.monotonic() + DRAIN_TIMEOUT
        for run, tree, _ in trees:
            if tree.main is not None:  # so the log is complete when stop() returns
                run.sink.drain(max(0.0, deadline - self._os.monotonic()))
        with self._lock:
            for run, tree, owned in trees:
                self._stopped(run, tree, owned)

    def _stopped(self, run: _Run, tree: Tree, owned: bool) -> None:
        """The stopper's verdict: STOPPED, or FAILED when something survived SIGKILL."""
        name = run.spec.name
        run.leftovers.clear()
        if owned:
            run.pid = None
            if run.stop_returncode is not None:
                run.last_exit = policy.describe_exit(run.stop_returncode)
        if tree.survivors:
            pids = ", ".join(map(str, sorted(tree.survivors)))
            self._set(run, State.FAILED, f"could not stop: pid {pids} survived SIGKILL")
            log.error('failed: "%s" %s', name, run.reason, **about(name))
        elif owned:
            how = f"SIGKILL after {tree.timeout:g}s" if tree.killed else f"last: {run.last_exit}"
            self._set(run, State.STOPPED, f"stopped by request ({how})")
            log.info('stopped: "%s" (%s)', name, how, **about(name))

    def _main_gone(self, tree: Tree) -> bool:
        """The stopped main's exit event arrived."""
        with self._lock:
            run = self._runs.get(tree.name)
            return run is None or run.pid != tree.main

    def _wait_event(self, timeout: float) -> None:
        """Until an exit event (or any state change) arrives, at most ``timeout`` s."""
        with self._lock:
            self._os.wait(self._changed, min(timeout, STEP_MAX))
