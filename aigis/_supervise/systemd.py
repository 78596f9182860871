"""The systemd backend: one ``aigis-plugin@NAME.service`` per plugin, its specifics in a drop-in.

systemd counts restarts, kills whole trees and keeps the logs; AIGIS writes the drop-ins, reloads
once per batch of changes, starts units, adopts units still running from an earlier core, and maps
systemd's states onto the shared vocabulary (``unitstate.describe``, pure).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aigis._config import Settings
from aigis._errors import AigisError, NotSupervised, PluginError
from aigis._log import about
from aigis._states import IDLE, State
from aigis._supervise.base import LogLocation, OutputCounts, ProcessSpec, Status
from aigis._supervise.dbus import MAX_JOBS, Systemd, SystemdError
from aigis._supervise.dropins import (
    UNIT_DIR,
    absolute_program,
    delete_dropin,
    delete_exit,
    dropin_path,
    make_exit_dir,
    read_exit,
    stopping_path,
    write_dropin,
)
from aigis._supervise.identity import prepare
from aigis._supervise.units import render_dropin, render_stopping_dropin, unit_name
from aigis._supervise.unitstate import (
    UnitState,
    collected,
    describe,
    parse_exit_record,
    with_exit_record,
)

log = logging.getLogger(__name__)

START_WAIT = 30.0  # how long a start job may take before we report the plugin as still starting
STOP_MARGIN = 5.0  # beyond TimeoutStopSec, then SIGKILL's own TimeoutStopSec: reaping, ExecStopPost
POLL_INTERVAL = 2.0  # how often poll() reads states to log transitions (systemd does the work)
QUIET = 0.5  # poll() applies a batch once no drop-in changed for this long (a reload in progress)
STEP_MIN, STEP_MAX = 0.02, 0.2
_UP = ("active", "activating", "reloading")  # ActiveStates with a process (or one on its way)
#: From this many plugins on, stop_all turns exit records off first (one daemon-reload costs
#: about what a few ExecStopPost= forks of PID 1 do).
STOPPING_MIN = 8
BUS_ERRORS = (OSError, SystemdError)  # OSError covers ConnectionError and TimeoutError


@dataclass
class _Plugin:
    """One supervised plugin: its spec, unit and drop-in; guarded by the supervisor's lock."""

    spec: ProcessSpec
    unit: str
    since: float
    stop_requested: bool = False
    error: str | None = None  # systemd refused to start it
    seen: tuple[str, str] | None = None  # (ActiveState, SubState) poll() last saw


class SystemdSupervisor:
    """Implements the Supervisor protocol on systemd's manager, over D-Bus."""

    name = "systemd"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        root: Path | str = "/",
        bus: str = "SYSTEM",
        systemd: Systemd | None = None,
    ) -> None:
        self.root = Path(root)
        self._systemd = systemd if systemd is not None else Systemd(bus)
        try:
            self.version = self._systemd.version()
        except BUS_ERRORS as exc:
            raise AigisError(f"the systemd supervisor cannot reach systemd: {exc}") from None
        self._plugins: dict[str, _Plugin] = {}
        self._lock = threading.Lock()  # the registry and the pending batch
        self._busy = threading.RLock()  # one batch or job-waiting operation at a time
        self._dirty = False  # drop-ins changed on disk since the last daemon-reload
        self._pending: dict[str, str] = {}  # name -> "start" | "restart", after the reload
        self._unchecked: dict[str, bool] = {}  # added, state not read yet -> drop-in rewritten
        self._halting = False
        self._next_poll = 0.0
        self._changed_at = 0.0  # monotonic time of the last add() or remove()
        self._last_error = ""  # what poll() last logged, so a lasting failure is logged once
        try:
            make_exit_dir(self.root)
        except OSError as exc:  # status then cannot tell a clean exit once systemd collected it
            log.warning("failed: cannot create the plugins' exit records directory: %s", exc)
        # An earlier core stopped every plugin with their exit records off: on again (the first
        # batch reloads systemd).
        with contextlib.suppress(FileNotFoundError):
            stopping_path(self.root).unlink()
            self._dirty = True

    # -- the Supervisor protocol ---------------------------------------------------------------
    def add(self, spec: ProcessSpec) -> None:
        """Write the drop-in; the next batch (``flush``) reads the unit's state and adopts it if
        it runs as is, else starts or restarts it (one batch of bus calls for many adds)."""
        unit = unit_name(spec.name)
        text = render_dropin(absolute_program(spec), self.version)
        path = dropin_path(self.root, unit)
        with self._lock:
            if self._halting:
                raise PluginError(spec.name, "not started: all plugins are being stopped")
            if spec.name in self._plugins:
                raise PluginError(spec.name, "already supervised (remove it before adding again)")
        # Also when adopting: the account must exist, files the core just fetched or copied
        # belong to the plugin, and this core's new socket lets the plugin reconnect.
        prepare(spec, self.root)
        try:
            current = path.read_text()
        except FileNotFoundError:
            current = None
        except OSError as exc:
            raise PluginError(spec.name, f"cannot read {path}: {exc}") from None
        if current != text:
            write_dropin(spec.name, path, text)
        with self._lock:
            self._plugins[spec.name] = _Plugin(spec, unit, since=time.time())
            self._changed_at = time.monotonic()
            self._dirty = self._dirty or current != text
            self._unchecked[spec.name] = current != text

    def start(self, name: str) -> Status:
        """Start a plugin that is not running, with a fresh restart count; blocks."""
        with self._busy:
            plugin = self._begin(name)
            self.flush()
            state = self._state(name, plugin.unit)
            if state.active_state in ("active", "reloading"):
                return self._status(plugin, state)
            how = "restart" if state.sub_state.startswith("auto-restart") else "start"
            self._run_jobs({name: how}, START_WAIT)
            return self.status([name])[0]

    def restart(self, name: str) -> Status:
        """Restart the unit (systemd resets NRestarts); blocks."""
        with self._busy:
            plugin = self._begin(name)
            self.flush()
            wait = 2 * plugin.spec.stop_timeout + STOP_MARGIN + START_WAIT
            self._run_jobs({name: "restart"}, wait)
            return self.status([name])[0]

    def stop(self, name: str) -> Status:
        """Stop the unit (its whole cgroup: SIGTERM, TimeoutStopSec, SIGKILL); blocks."""
        with self._busy:
            with self._lock:
                plugin = self._get(name)
                self._pending.pop(name, None)  # no flush: removals stay batched in one reload
                self._unchecked.pop(name, None)
            state = self._state(name, plugin.unit)
            if state.active_state in ("inactive", "failed") and not state.job_id:
                return self._status(plugin, state)  # exited, failed or stopped: nothing to do
            with self._lock:
                plugin.stop_requested = True
            self._run_jobs({name: "stop"}, 2 * plugin.spec.stop_timeout + STOP_MARGIN)
            status = self._read([name])[0]
        log.info('stopped: "%s" (last: %s)', name, status.last_exit or "-", **about(name))
        return status

    def remove(self, name: str) -> None:
        """Stop the unit, forget its failures and delete its drop-in (reloaded with the batch)."""
        with self._busy:
            self.stop(name)
            with self._lock:
                plugin = self._plugins.pop(name)
                self._pending.pop(name, None)
                self._unchecked.pop(name, None)
            # Best effort from here: the plugin is already forgotten, so a bus error must not
            # leave a name that can be neither removed nor added again.
            try:
                self._systemd.reset_failed(plugin.unit)
            except BUS_ERRORS as exc:
                log.warning(
                    'failed: "%s": reset-failed %s: %s', name, plugin.unit, exc, **about(name)
                )
            delete_dropin(dropin_path(self.root, plugin.unit))
            delete_exit(self.root, plugin.unit)
            with self._lock:
                self._dirty = True
                self._changed_at = time.monotonic()

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        """Snapshots read from systemd in one pipelined batch, in registration order.

        The pending batch is applied first only when no other operation holds the supervisor:
        status must answer while a plugin is being stopped (it then reads what systemd says).
        """
        if self._busy.acquire(blocking=False):
            try:
                self.flush()
            finally:
                self._busy.release()
        return self._read(names)

    def _read(self, names: Iterable[str] | None = None) -> list[Status]:
        """``status`` without applying the pending batch first."""
        with self._lock:
            wanted = list(self._plugins) if names is None else list(names)
            plugins = [self._get(name) for name in wanted]
        try:
            states = self._systemd.states([p.unit for p in plugins])
        except BUS_ERRORS as exc:
            raise AigisError(f"cannot read plugin states from systemd: {exc}") from None
        return [self._status(p, self._with_exit(s)) for p, s in zip(plugins, states)]

    def _with_exit(self, state: UnitState) -> UnitState:
        """``state``, with how the last process ended read from the unit's exit record when
        systemd has collected the inactive unit (a clean exit, a stop)."""
        if not collected(state):
            return state
        found = read_exit(self.root, state.unit)
        return with_exit_record(state, parse_exit_record(*found) if found else None)

    def poll(self) -> None:
        """Apply the pending batch once changes pause; every few seconds log what systemd did."""
        try:
            now = time.monotonic()
            with self._lock:
                settled = now - self._changed_at >= QUIET
            # Never wait here: the main loop must keep pinging the watchdog while another
            # thread (a reload, an aigisctl stop) holds the supervisor for seconds.
            if settled and self._busy.acquire(blocking=False):
                try:
                    self.flush(wait=False)
                finally:
                    self._busy.release()
            if now >= self._next_poll:
                self._next_poll = now + POLL_INTERVAL
                self._log_transitions()
        except AigisError as exc:
            if str(exc) != self._last_error:  # once, not every tick
                log.error("failed: %s", exc)
            self._last_error = str(exc)
        else:
            self._last_error = ""

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        """Stop every unit: one step's jobs queued together and waited for, the steps in order,
        then the rest together; nothing starts again."""
        with self._busy:
            with self._lock:
                self._halting = True
                self._pending.clear()
                self._unchecked.clear()
                named = [n for step in steps for n in step if n in self._plugins]
                rest = [n for n in reversed(self._plugins) if n not in named]
            if len(self._plugins) >= STOPPING_MIN:  # one daemon-reload, not a fork of PID 1 each
                try:
                    write_dropin("*", stopping_path(self.root), render_stopping_dropin())
                    self._dirty = True
                except PluginError as exc:
                    log.warning("failed: %s (each stop records its exit)", exc.reason)
            self.flush()  # e.g. the drop-ins removed just before
            for step in [*steps, rest]:
                with self._lock:
                    names = [n for n in step if n in self._plugins]
                    wait = max((2 * self._plugins[n].spec.stop_timeout for n in names), default=0)
                if not names:
                    continue
                live = [s.name for s in self._read(names) if s.state not in IDLE]
                with self._lock:
                    for name in live:
                        self._plugins[name].stop_requested = True
                if live:
                    self._run_jobs(dict.fromkeys(live, "stop"), wait + STOP_MARGIN)

    def retire_unknown(self, configured: Iterable[str]) -> list[str]:
        """Stop and forget ``aigis-plugin@`` units of plugins the config no longer lists (removed
        while the core was down). Units of listed plugins that failed to load are left alone.
        Returns the units retired."""
        with self._lock:
            ours = {p.unit for p in self._plugins.values()} | {unit_name(n) for n in configured}
        try:
            units = [u for u in self._systemd.list_units("aigis-plugin@*.service") if u not in ours]
        except BUS_ERRORS as exc:
            raise AigisError(f"cannot list plugin units: {exc}") from None
        for directory in (self.root / UNIT_DIR).glob("aigis-plugin@?*.service.d"):
            unit = directory.name.removesuffix(".d")  # ?*: never the template's own directory
            if unit not in ours and unit not in units:
                units.append(unit)
        for unit in units:
            log.warning("retiring: %s (not in the config)", unit)
            try:
                self._systemd.stop(unit)
            except BUS_ERRORS as exc:
                log.error("failed: could not stop %s: %s", unit, exc)
            delete_dropin(dropin_path(self.root, unit))
            delete_exit(self.root, unit)
            with contextlib.suppress(*BUS_ERRORS):
                self._systemd.reset_failed(unit)
        if units:
            with self._lock:
                self._dirty = True
                self._changed_at = time.monotonic()
        return units

    def core_restarting(self) -> bool:
        """True while systemd restarts the core's own unit (``systemctl restart aigis``, a package
        upgrade): plugin units then keep running and the next core adopts them."""
        try:
            unit = self._systemd.unit_of_pid(os.getpid())
            return self._systemd.job_type(unit) in ("restart", "try-restart")
        except BUS_ERRORS:
            return False

    def log_location(self, name: str) -> LogLocation:
        """The journal of ``aigis-plugin@NAME.service`` (``journalctl -u``)."""
        return LogLocation(journal_unit=unit_name(name))

    def output_counts(self) -> dict[str, OutputCounts]:
        """None: journald keeps the plugins' output, the core never sees it."""
        return {}

    def close(self) -> None:
        """Close the D-Bus connection (systemd then may collect the units it kept for us)."""
        self._systemd.close()

    # -- batches and jobs ----------------------------------------------------------------------
    def flush(self, wait: bool = True) -> None:
        """For the plugins added since the last batch, one read of their units' states (adopt
        what runs as is); one daemon-reload for every drop-in written; then every pending job
        queued in one pipelined batch. ``wait``: until the jobs finish (bounded by START_WAIT)."""
        with self._busy:
            self._check_added()  # units running as is are adopted, as they run
            with self._lock:
                dirty, self._dirty = self._dirty, False
                pending, self._pending = self._pending, {}
            if dirty:
                try:
                    self._systemd.reload()
                except BUS_ERRORS as exc:
                    with self._lock:
                        self._dirty = True
                        self._pending = {**pending, **self._pending}
                    raise AigisError(f"systemd daemon-reload failed: {exc}") from None
                log.debug("reloaded: systemd (%d pending starts)", len(pending))
            if pending:
                self._run_jobs(pending, START_WAIT if wait else 0.0)

    def _check_added(self) -> list[str]:
        """Read the states of the units added since the last batch, before any daemon-reload:
        a unit running with the same drop-in is adopted (returned), others start or restart."""
        with self._lock:
            unchecked, self._unchecked = self._unchecked, {}
            plugins = {n: self._plugins[n] for n in unchecked if n in self._plugins}
        if not plugins:
            return []
        try:
            # One cheap call for all; the full state only of units that run (adoption).
            brief = self._systemd.brief([p.unit for p in plugins.values()])
            up = [n for n, p in plugins.items() if brief.get(p.unit, ("",))[0] in _UP]
            units = [plugins[n].unit for n in up]
            states = dict(zip(up, self._systemd.states(units, fresh=True)))
        except BUS_ERRORS as exc:
            with self._lock:
                self._unchecked = {**unchecked, **self._unchecked}
            raise AigisError(f"cannot read plugin units from systemd: {exc}") from None
        adopt = []
        with self._lock:
            for name, plugin in plugins.items():
                state = states.get(name)
                running = state is not None and state.active_state in _UP
                if state is not None and running and not unchecked[name] and not state.need_reload:
                    adopt.append(name)
                    log.info(
                        'adopted: "%s" %s pid %s', name, plugin.unit, state.main_pid, **about(name)
                    )
                else:
                    self._pending[name] = "restart" if running else "start"
                    self._dirty = self._dirty or (state is not None and state.need_reload)
        return adopt

    def _run_jobs(self, jobs: dict[str, str], wait: float) -> None:
        """Queue ``{name: start|restart|stop}`` in pipelined batches, at most MAX_JOBS of our
        jobs unfinished at once (more would exhaust systemd's bus connection), then wait
        (bounded by ``wait``) for them to finish."""
        with self._lock:
            plugins = [(n, self._plugins[n]) for n in jobs if n in self._plugins]
        queued: list[str] = []  # units whose job was queued
        unfinished: list[str] = []
        limit = time.monotonic() + max(wait, START_WAIT)  # for room to queue the next batch
        for first in range(0, len(plugins), MAX_JOBS):
            batch = plugins[first : first + MAX_JOBS]
            if unfinished:
                unfinished = self._wait_jobs(unfinished, limit, room=MAX_JOBS - len(batch))
            done = self._queue_jobs(batch, jobs)
            queued += done
            unfinished += done
        if wait > 0 and queued:
            left = self._wait_jobs(queued, time.monotonic() + wait, room=0)
            if left:
                more = f" and {len(left) - 5} more" if len(left) > 5 else ""
                sample = ", ".join(left[:5]) + more
                log.warning("still waiting: jobs of %s after %gs", sample, wait)

    def _queue_jobs(self, batch: list[tuple[str, _Plugin]], jobs: dict[str, str]) -> list[str]:
        """One pipelined batch of jobs; returns the units whose job systemd queued."""
        errors: dict[str, Exception | None]
        try:
            errors = dict(self._systemd.jobs([(p.unit, jobs[n]) for n, p in batch]))
        except BUS_ERRORS as exc:
            errors = {p.unit: exc for _, p in batch}
        queued = []
        for name, plugin in batch:
            how, error = jobs[name], errors.get(plugin.unit)
            if error is not None:
                with self._lock:
                    plugin.error = f"could not {how}: {error}"
                log.error('failed: "%s" could not %s: %s', name, how, error, **about(name))
                continue
            with self._lock:
                plugin.error = None
                plugin.since = time.time()
            queued.append(plugin.unit)
            if how != "stop":
                log.info('started: "%s" %s (%s)', name, plugin.unit, how, **about(name))
        return queued

    def _wait_jobs(self, units: list[str], deadline: float, room: int) -> list[str]:
        """Wait until at most ``room`` of ``units`` have a job, or the deadline; returns those
        that still have one."""
        step = STEP_MIN
        while True:
            try:
                brief = self._systemd.brief(units)
            except BUS_ERRORS as exc:
                raise AigisError(f"cannot read unit states from systemd: {exc}") from None
            units = [unit for unit in units if brief.get(unit, ("", "", 0))[2]]
            if len(units) <= room or time.monotonic() >= deadline:
                return units
            time.sleep(step)
            step = min(step * 1.5, STEP_MAX)

    # -- helpers -------------------------------------------------------------------------------
    def _begin(self, name: str) -> _Plugin:
        """The plugin, cleared for a requested (re)start."""
        with self._lock:
            if self._halting:
                raise PluginError(name, "not started: all plugins are being stopped")
            plugin = self._get(name)
            plugin.stop_requested = False
            self._pending.pop(name, None)
            return plugin

    def _get(self, name: str) -> _Plugin:
        plugin = self._plugins.get(name)
        if plugin is None:
            raise NotSupervised(name)
        return plugin

    def _state(self, name: str, unit: str) -> UnitState:
        try:
            return self._systemd.state(unit)
        except BUS_ERRORS as exc:
            raise PluginError(name, f"cannot read {unit} from systemd: {exc}") from None

    def _status(self, plugin: _Plugin, unit: UnitState) -> Status:
        spec = plugin.spec
        if plugin.stop_requested and unit.active_state in _UP and not unit.job_id:
            plugin.stop_requested = False  # started again behind our back (systemctl start)
        view = describe(unit, restart_limit=spec.restart, stop_requested=plugin.stop_requested)
        state, reason, gave_up = view.state, view.reason, view.gave_up
        if plugin.error and state in (State.STOPPED, State.FAILED):
            state, reason, gave_up = State.FAILED, plugin.error, False
        since = unit.state_change or plugin.since
        started = unit.exec_main_start or None
        pid = unit.main_pid or None
        return Status(
            spec.name, spec.kind, state, pid, view.restarts, since, started, view.last_exit,
            reason, gave_up,
        )  # fmt: skip

    def _log_transitions(self) -> None:
        """Verb-first lines for what systemd did on its own (exits, restarts, giving up): one
        cheap call for every unit's state, full reads only for the units that changed."""
        with self._lock:
            plugins = {p.unit: p for n, p in self._plugins.items() if n not in self._pending}
        try:
            brief = self._systemd.brief(list(plugins))
        except BUS_ERRORS as exc:
            raise AigisError(f"cannot read unit states from systemd: {exc}") from None
        changed = []
        for unit, plugin in plugins.items():
            now = brief.get(unit, ("", "", 0))[:2]
            if now != plugin.seen:
                first, plugin.seen = plugin.seen is None, now
                if not first:
                    changed.append(plugin.spec.name)
        verbs = {State.BACKOFF: "backoff", State.FAILED: "gave up", State.EXITED: "exited"}
        for status in self._read(changed) if changed else []:
            verb = verbs.get(status.state)
            if verb is None:
                continue
            if status.state is State.FAILED and not status.gave_up:
                verb = "failed"
            level = logging.ERROR if status.state is State.FAILED else logging.WARNING
            if status.state is State.EXITED:
                level = logging.INFO
            log.log(level, '%s: "%s" %s', verb, status.name, status.reason, **about(status.name))
