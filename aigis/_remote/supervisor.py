"""The Supervisor of one remote host: its plugins as ``aigis-plugin@NAME`` under its systemd.

Everything goes over the host's one ssh master (``Master``). ``add`` only registers: a worker
thread per host ships each new plugin (checkout, secrets, keys, runtime), checks its system
requirements and runs its requirements command there, writes its drop-in, then reloads systemd
once for the batch and starts, restarts or adopts the units. A host that cannot be reached fails
only its plugins, with ssh's one-line reason, and is tried again with backoff; units already
running there are left alone (their systemd supervises them) and show as ``unknown`` until the
host answers again. States come from one ``systemctl show`` per host.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from aigis._config import Settings
from aigis._errors import NotSupervised, PluginError
from aigis._log import about
from aigis._remote import hostside
from aigis._remote.hosts import HostError, HostSpec
from aigis._remote.plan import (
    EXT_DIR,
    HOST_ROOT,
    REMOTE_TEMPLATE,
    STAMPS_DIR,
    core_forward,
    parse_show,
    requirements_line,
    show_argv,
)
from aigis._remote.runtime import stage
from aigis._remote.ship import ship
from aigis._remote.ssh import Master, SshSettings, command_argv
from aigis._requirements import requirements_shell
from aigis._states import IDLE, State
from aigis._supervise.base import LogLocation, OutputCounts, ProcessSpec, Status
from aigis._supervise.dbus import Systemd, SystemdError
from aigis._supervise.identity import sysusers_line
from aigis._supervise.units import DROPIN_NAME, plugin_of_unit, plugin_user, render_dropin
from aigis._supervise.units import unit_name as unit_of
from aigis._supervise.unitstate import UnitState, describe

log = logging.getLogger(__name__)

HOSTSIDE = Path(hostside.__file__).read_text()
PROBE_INTERVAL = 5.0  # how often the worker reads the host's units (transitions, link down)
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0  # retrying an unreachable host
STOP_MARGIN = 15.0
PARALLEL = 8  # plugins of one host prepared at once
#: A state read (one multiplexed systemctl show, normally tens of ms) taking longer than this
#: means the link is gone: status then answers "unknown" at once instead of hanging.
READ_WAIT = 3.0
HOST_BUS = "/run/dbus/system_bus_socket"
QUIET = 0.2  # the worker starts a batch once no plugin was added for this long
_UP = ("active", "activating", "reloading")
_runtime_lock = threading.Lock()
_staged: dict[Path, Path] = {}


def ssh_settings(settings: Settings) -> SshSettings:
    """How every host is reached, from the ``[aigis]`` settings."""
    return SshSettings(
        runtime_dir=settings.runtime_dir,
        known_hosts=settings.known_hosts,
        connect_timeout=max(1, math.ceil(settings.connect_timeout)),
        config_file=str(settings.ssh_config) if settings.ssh_config else None,
    )


def staged_runtime(settings: Settings) -> Path:
    """The runtime directory to ship, built once per core process."""
    target = settings.state_dir / "remote-runtime"
    with _runtime_lock:
        if target not in _staged:
            _staged[target] = stage(target)
        return _staged[target]


@dataclass
class _Plugin:
    """One plugin on the host; guarded by the supervisor's lock."""

    spec: ProcessSpec
    unit: str
    since: float
    queued: bool = True  # waiting to be shipped and started
    started: bool = False  # its unit was started or adopted: systemd has its state
    error: str | None = None  # could not be prepared (its own fault): failed until started again
    stop_requested: bool = False
    seen: tuple[str, str] | None = None


class RemoteSupervisor:
    """Implements the Supervisor protocol for the plugins of one remote host."""

    name = "remote"

    def __init__(
        self,
        host: HostSpec,
        settings: Settings,
        *,
        master: Master | None = None,
        skip_requirements: bool = False,
    ) -> None:
        self.host = host
        self.settings = settings
        self.master = master if master is not None else Master(host, ssh_settings(settings))
        self.skip_requirements = skip_requirements or settings.requirements == "skip"
        self._plugins: dict[str, _Plugin] = {}
        self._lock = threading.Lock()
        self._busy = threading.RLock()  # one round of ssh work on this host at a time
        self._wake = threading.Event()
        self._closing = False
        self._halting = False
        self._down_since: float | None = None
        self._down_reason = ""
        self._down_error = ""
        self._checked = False
        self._retire: set[str] | None = None  # retire_unknown asked, not done yet
        self._leftovers: list[str] = []  # units removed while halting: drop-ins go at close
        self._bus: Systemd | None = None  # the host's systemd over its forwarded D-Bus socket
        self._bus_new = False
        self._use_bus = True
        self._referenced: set[str] = set()  # units referenced on the current bus connection
        self._bus_lock = threading.Lock()
        self._added_at = 0.0
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._runtime_shipped = False
        self._systemd_version = 0
        self._python: str | None = None
        self._next_probe = 0.0
        self._thread = threading.Thread(
            target=self._worker, name=f"aigis-host-{host.name}", daemon=True
        )
        self._thread.start()

    # -- the Supervisor protocol ---------------------------------------------------------------
    def add(self, spec: ProcessSpec) -> None:
        """Register ``spec``; the host's worker ships and starts (or adopts) it."""
        with self._lock:
            if self._halting:
                raise PluginError(spec.name, "not started: all plugins are being stopped")
            if spec.name in self._plugins:
                raise PluginError(spec.name, "already supervised (remove it before adding again)")
            self._plugins[spec.name] = _Plugin(spec, unit_of(spec.name), since=time.time())
            self._added_at = time.monotonic()
        self._wake.set()

    def start(self, name: str) -> Status:
        with self._busy:
            with self._lock:
                plugin = self._get(name)
                plugin.stop_requested = False
                if not plugin.started:
                    plugin.queued, plugin.error = True, None
                    self._retry_at = 0.0
            if plugin.started:
                self._jobs(name, start=[plugin.unit])
            else:
                self._work()
        return self.status([name])[0]

    def restart(self, name: str) -> Status:
        with self._busy:
            with self._lock:
                plugin = self._get(name)
                plugin.stop_requested = False
            if not plugin.started:
                return self.start(name)
            self._jobs(name, restart=[plugin.unit])
        return self.status([name])[0]

    def stop(self, name: str) -> Status:
        with self._busy:
            with self._lock:
                plugin = self._get(name)
                plugin.stop_requested = True
                plugin.queued = False
            if plugin.started:
                self._jobs(name, stop=[plugin.unit], timeout=self._stop_wait([plugin]))
                log.info('stopped: "%s" on host %s', name, self.host.name, **about(name))
        return self.status([name])[0]

    def remove(self, name: str) -> None:
        """Stop the unit, delete its drop-in (one daemon-reload) and forget it. A host that
        cannot be reached raises PluginError: its unit may still run there. While every plugin
        is being stopped, the drop-ins go at ``close``, all in one round."""
        with self._busy:
            with self._lock:
                plugin = self._get(name)
                halting = self._halting
            if not halting:
                self.stop(name)
            if plugin.started and halting:
                with self._lock:
                    self._leftovers.append(plugin.unit)
            elif plugin.started:
                dropin = f"/run/systemd/system/{plugin.unit}.d/{DROPIN_NAME}"
                self._jobs(name, delete=[dropin], forget=[plugin.unit], reload=True)
            with self._lock:
                self._plugins.pop(name, None)

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        """Snapshots from one ``systemctl show`` of the started units; when the host cannot
        be reached: unknown, with since when."""
        with self._lock:
            wanted = list(self._plugins) if names is None else list(names)
            plugins = [self._get(n) for n in wanted]
        started = [p for p in plugins if p.started]
        states = self._read(started) if started else {}
        return [self._status(p, states.get(p.unit)) for p in plugins]

    def poll(self) -> None:
        """The worker does the work; nothing to do in the main loop."""

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        """Stop every unit of this host, step by step (one systemctl call per step)."""
        with self._lock:
            self._halting = True
            for plugin in self._plugins.values():
                plugin.queued = False
            named = [n for step in steps for n in step if n in self._plugins]
            rest = [n for n in reversed(self._plugins) if n not in named]
        with self._busy:
            for step in [*steps, rest]:
                with self._lock:
                    plugins = [self._plugins[n] for n in step if n in self._plugins]
                    live = [p for p in plugins if p.started]
                    for p in plugins:
                        p.stop_requested = True
                if live:
                    try:
                        self._run_jobs(stop=[p.unit for p in live], timeout=self._stop_wait(live))
                    except HostError as exc:
                        log.error("failed: stopping plugins on host %s: %s", self.host.name, exc)
                        return
                    log.info("stopped: %s on host %s", ", ".join(p.spec.name for p in live),
                             self.host.name)  # fmt: skip

    def retire_unknown(self, keep: Iterable[str]) -> list[str]:
        """Have the worker stop and forget, once the host answers, the ``aigis-plugin@`` units
        there of plugins it does not run now, except those in ``keep`` (listed, but not loaded
        or failed to load). Returns [] (the worker logs what it retires)."""
        with self._lock:
            self._retire = set(keep)
        self._wake.set()
        return []

    def _retire_units(self) -> None:
        with self._lock:
            keep, self._retire = self._retire, None
            ours = {p.unit for p in self._plugins.values()}
        if keep is None:
            return
        kept = {unit_of(n) for n in keep}
        try:
            result = self.master.run(
                ["systemctl", "list-units", "--all", "--plain", "--no-legend", "--full",
                 "aigis-plugin@*.service"], timeout=self._timeout(),
            )  # fmt: skip
            units = [
                line.split()[0] for line in result.stdout.decode().splitlines() if line.strip()
            ]
            units = [u for u in units if plugin_of_unit(u) and u not in ours and u not in kept]
            for unit in units:
                log.warning("retiring: %s on host %s (the config runs no such plugin there)", unit,
                            self.host.name)  # fmt: skip
            if units:
                dropins = [f"/run/systemd/system/{u}.d/{DROPIN_NAME}" for u in units]
                self._run_jobs(stop=units, delete=dropins, forget=units, reload=True)
        except HostError as exc:
            with self._lock:
                self._retire = keep if self._retire is None else self._retire
            self._host_down(exc)

    def core_restarting(self) -> bool:
        return False

    def log_location(self, name: str) -> LogLocation:
        """The unit's journal on the host, and the ssh command line that reaches it."""
        with self._lock:
            plugin = self._get(name)
        argv = command_argv(self.host, self.master.settings, ["true"])[:-1]
        return LogLocation(journal_unit=plugin.unit, ssh=(*self.master.wrap, *argv))

    def output_counts(self) -> dict[str, OutputCounts]:
        """Nothing: the output of this host's plugins is its journal's."""
        return {}

    def close(self) -> None:
        """Stop the worker and end the master connection."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=2 * self.master.settings.connect_timeout + 30)
        with self._lock:
            units, self._leftovers = self._leftovers, []
        if units:
            dropins = [f"/run/systemd/system/{u}.d/{DROPIN_NAME}" for u in units]
            try:
                self._run_jobs(delete=dropins, forget=units, reload=True)
            except HostError as exc:
                log.warning("failed: removing drop-ins on host %s: %s", self.host.name, exc)
        if self._bus is not None:
            self._bus.close()
        try:
            self.master.close()
        except HostError as exc:
            log.warning("failed: closing the connection to host %s: %s", self.host.name, exc)

    # -- the worker ----------------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._closing:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._closing:
                return
            try:
                with self._busy:
                    self._work()
                    retire_due = time.monotonic() >= self._retry_at
                    if self._retire is not None and retire_due and self._connect():
                        self._retire_units()
                    if time.monotonic() >= self._next_probe:
                        self._next_probe = time.monotonic() + PROBE_INTERVAL
                        self._probe()
            except Exception:  # a bug must not end the host's worker
                log.exception("failed: working on host %s", self.host.name)

    def _work(self) -> None:
        """Ship and start every queued plugin (one reload and one batch of jobs for all)."""
        with self._lock:
            queue = [p for p in self._plugins.values() if p.queued and not self._halting]
            settling = QUIET - (time.monotonic() - self._added_at)
        if not queue or time.monotonic() < self._retry_at:
            return
        if settling > 0:  # plugins are being added: take them in one batch (one reload)
            time.sleep(settling)
            with self._lock:
                queue = [p for p in self._plugins.values() if p.queued and not self._halting]
        if not self._connect():
            return
        try:
            if any(p.spec.shipment and p.spec.shipment.runtime for p in queue):
                self._ship_runtime()
        except HostError as exc:
            self._host_down(exc)
            return
        prepared: dict[str, bool] = {}
        # Several plugins at once over the one master (it multiplexes): each round trip waits
        # on the host's python more than on the link.
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(queue))) as pool:
            outcomes = list(pool.map(self._try_prepare, queue))
        lost = None
        for plugin, outcome in zip(queue, outcomes, strict=True):
            name = plugin.spec.name
            if isinstance(outcome, HostError):
                lost = outcome  # stays queued: tried again with the host
            elif isinstance(outcome, str):
                with self._lock:
                    plugin.queued, plugin.error = False, outcome
                log.error('failed: plugin "%s" on host %s: %s', name, self.host.name, outcome,
                          **about(name))  # fmt: skip
            else:
                prepared[name] = outcome
        if lost is not None:
            self._host_down(lost)
        if prepared:
            try:
                self._launch(prepared)
            except HostError as exc:
                self._host_down(exc)

    def _connect(self) -> bool:
        """The master up, and the host checked once (python, systemd: one clear line if not);
        False (the host marked down) when it fails."""
        try:
            self.master.open()
            if not self._checked:
                self._checked = self.master.check() is not None
            self._forward_core()
        except HostError as exc:
            self._host_down(exc)
            return False
        self._host_up()
        return True

    def _forward_core(self) -> None:
        """For ``core_address = "ssh"``: the host's loopback port to the core's TCP listener,
        over the master (again after the master was replaced)."""
        try:
            forward = core_forward(self.host, self.settings.tcp)
        except ValueError as exc:
            raise HostError(self.host.name, "failed", str(exc)) from None
        if forward is not None:
            self.master.forward_remote(*forward)

    def _try_prepare(self, plugin: _Plugin) -> bool | str | HostError:
        """``_prepare``: whether the drop-in changed, the plugin's failure, or the host's."""
        try:
            return self._prepare(plugin)
        except HostError as exc:
            return exc
        except PluginError as exc:
            return exc.reason
        except (OSError, ValueError) as exc:
            return str(exc)

    def _prepare(self, plugin: _Plugin) -> bool:
        """Account, system requirements, checkout, requirements, keys and drop-in on the host;
        True when the drop-in (or a key) changed."""
        spec, name = plugin.spec, plugin.spec.name
        shipment = spec.shipment
        assert shipment is not None
        own = spec.user == plugin_user(name)
        answer = self._hostside(name, "prepare", {
            "user": spec.user,
            "sysusers": sysusers_line(replace(spec, own_dir=Path(shipment.dest))) if own else None,
            "which": list(shipment.system_requirements),
        })  # fmt: skip
        self._python = answer["python"]
        self._systemd_version = int(answer.get("systemd") or 0)
        if answer["missing"]:
            missing = ", ".join(answer["missing"])
            raise PluginError(name, f"missing system requirements on host {self.host.name}: "
                              f"{missing} (SYSTEM_REQUIREMENTS; not on PATH)")  # fmt: skip
        owner = spec.user if spec.user not in (None, "root") else None
        ship(self.master, name, shipment.source, secrets=dict(shipment.secrets),
             secret_owner=owner, dest_root=EXT_DIR)  # fmt: skip
        requirements = None
        if shipment.requirements is not None and not self.skip_requirements:
            command, file, cwd, stamp = shipment.requirements
            shell = requirements_shell(command, file or None)
            requirements = {
                "shell": requirements_line(shell, cwd), "stamp": stamp,
                "marker": f"{STAMPS_DIR}/{name}.sha256",
                "timeout": self.settings.requirements_timeout,
            }  # fmt: skip
        argv = spec.argv
        if argv[0] == self.host.python and "/" not in argv[0] and self._python:
            argv = (self._python, *argv[1:])  # ExecStart= wants it absolute
        remote = replace(spec, argv=argv)
        answer = self._hostside(name, "install", {
            "requirements": requirements,
            "files": {path: local.read_bytes().hex() for path, local in shipment.files},
            "template": REMOTE_TEMPLATE,
            "dropin": {
                "path": f"/run/systemd/system/{plugin.unit}.d/{DROPIN_NAME}",
                "text": render_dropin(remote, self._systemd_version or 252, exit_dir=None),
            },
        }, timeout=self.settings.requirements_timeout + 60)  # fmt: skip
        done = answer.get("requirements")
        if done and done.get("ran"):
            lines = (done.get("output") or "").strip().splitlines()
            for line in lines[-20:]:
                log.info('requirements: "%s" on host %s: %s', name, self.host.name, line,
                         **about(name))  # fmt: skip
            if done.get("code") != 0:
                why = f"exit {done['code']}" if done.get("code") is not None else "timed out"
                raise PluginError(name, f"requirements command failed on host {self.host.name} "
                                  f"({why}): {lines[-1] if lines else 'no output'}")  # fmt: skip
        return bool(answer.get("changed"))

    def _launch(self, prepared: dict[str, bool]) -> None:
        """One reload for the batch, then adopt what runs as is, restart what changed, start
        the rest."""
        with self._lock:
            plugins = {n: self._plugins[n] for n in prepared if n in self._plugins}
        states = self._read(list(plugins.values()), quiet=False)
        start, restart = [], []
        for name, plugin in plugins.items():
            state = states[plugin.unit]
            running = state.active_state in _UP
            if running and not prepared[name] and not state.need_reload:
                log.info('adopted: "%s" %s on host %s pid %s', name, plugin.unit,
                         self.host.name, state.main_pid, **about(name))  # fmt: skip
            elif running:
                restart.append(plugin.unit)
            else:
                start.append(plugin.unit)
        reload = any(prepared.values()) or any(s.need_reload for s in states.values())
        errors = {}
        if start or restart or reload:  # all adopted as they are: no round at all
            errors = self._run_jobs(start=start, restart=restart, reload=reload)
        with self._lock:
            for name, plugin in plugins.items():
                plugin.queued, plugin.since = False, time.time()
                error = errors.get(plugin.unit) or errors.get("*")
                if error:
                    plugin.error = f"could not start on host {self.host.name}: {error}"
                    log.error('failed: "%s" %s', name, plugin.error, **about(name))
                else:
                    plugin.started, plugin.error = True, None
                    if plugin.unit in start or plugin.unit in restart:
                        log.info('started: "%s" %s on host %s', name, plugin.unit,
                                 self.host.name, **about(name))  # fmt: skip

    def _ship_runtime(self) -> None:
        if not self._runtime_shipped:
            ship(self.master, "lib", staged_runtime(self.settings), dest_root=HOST_ROOT)
            self._runtime_shipped = True

    def _probe(self) -> None:
        """Read every started unit: log what the host's systemd did; notice a lost link."""
        with self._lock:
            plugins = [p for p in self._plugins.values() if p.started]
        if not plugins or self._down_since is not None and time.monotonic() < self._retry_at:
            return
        try:
            self.master.open()  # a master lost with the link comes back here, not in status
            self._forward_core()  # and its forward of the core's port with it
        except HostError as exc:
            self._host_down(exc)
            return
        states = self._read(plugins)
        verbs = {State.BACKOFF: "backoff", State.FAILED: "gave up", State.EXITED: "exited"}
        for plugin in plugins:
            state = states.get(plugin.unit)
            if state is None:
                continue
            now = (state.active_state, state.sub_state)
            first, changed = plugin.seen is None, now != plugin.seen
            plugin.seen = now
            if first or not changed:
                continue
            status = self._status(plugin, state)
            verb = verbs.get(status.state)
            if verb is not None:
                level = logging.ERROR if status.state is State.FAILED else logging.WARNING
                log.log(level, '%s: "%s" on host %s: %s', verb, plugin.spec.name, self.host.name,
                        status.reason, **about(plugin.spec.name))  # fmt: skip

    # -- ssh rounds ----------------------------------------------------------------------------
    def _timeout(self) -> float:
        return self.master.settings.connect_timeout + 10.0

    def _read(self, plugins: list[_Plugin], quiet: bool = True) -> dict[str, UnitState]:
        """The units' states in one round; {} (and the host marked down) when it fails, or
        HostError when not ``quiet``. Never waits for a reconnection (the worker does that)."""
        if quiet and self._down_since is not None and time.monotonic() < self._retry_at:
            return {}
        units = [p.unit for p in plugins]
        try:
            # (A bus connection fails on its own when the master goes; a fresh ssh command
            # would instead bring up a new master, which is the worker's business.)
            if quiet and self._bus is None and self.master.master_pid() is None:
                raise HostError(self.host.name, "unreachable", "connection lost; reconnecting")
            states = self._states(units)
        except HostError as exc:
            if not quiet:
                raise
            self._host_down(exc)
            return {}
        self._host_up()
        return dict(zip(units, states, strict=True))

    def _states(self, units: list[str]) -> list[UnitState]:
        """Over the host's D-Bus, forwarded by the master (pipelined calls on one connection:
        no process on either side); where that fails at once, one ``systemctl show``."""
        with self._bus_lock:  # status (control threads) and the worker read at once
            return self._states_locked(units)

    def _states_locked(self, units: list[str]) -> list[UnitState]:
        if self._bus is None and self._use_bus:
            try:
                path = self.master.forward(HOST_BUS, "bus")
            except HostError as exc:
                if exc.kind != "failed":
                    raise
                log.info("fallback: host %s: %s; using systemctl", self.host.name, exc)
                self._use_bus = False
            else:
                self._bus = Systemd(f"unix:path={path}", timeout=READ_WAIT)
                self._bus_new = True
                self._referenced = set()
        if self._bus is not None:
            try:
                new = [unit for unit in units if unit not in self._referenced]
                if new:  # a unit that exits cleanly keeps its exit status
                    self._bus.ref(new)
                    self._referenced.update(new)
                states = self._bus.states(units)
                self._bus_new = False
                return states
            except (OSError, SystemdError) as exc:
                self._bus.close()
                self._bus = None
                if not self._bus_new:
                    raise HostError(self.host.name, "unreachable", f"no answer: {exc}") from None
                log.info("fallback: host %s: systemd's bus over ssh: %s; using systemctl",
                         self.host.name, exc)  # fmt: skip
                self._use_bus = False
        result = self.master.run(show_argv(units), timeout=READ_WAIT)
        return parse_show(result.stdout.decode(errors="replace"), units)

    def _hostside(self, name: str, command: str, request: dict, timeout: float = 120) -> dict:
        result = self.master.run(
            [self.host.python, "-c", HOSTSIDE, command],
            input=json.dumps(request).encode(), timeout=timeout,
        )  # fmt: skip
        if result.returncode == 127:
            raise HostError(self.host.name, "no-python", f"{self.host.python} not found")
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
            raise PluginError(name, f"on host {self.host.name}: {lines[-1]}")
        return json.loads(result.stdout)

    def _run_jobs(self, timeout: float = 120, **request: object) -> dict[str, str]:
        """One ``jobs`` round; {unit: error} of the units systemd refused."""
        result = self.master.run(
            [self.host.python, "-c", HOSTSIDE, "jobs"],
            input=json.dumps(request).encode(), timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
            raise HostError(self.host.name, "failed", f"systemctl failed: {lines[-1]}")
        return json.loads(result.stdout).get("errors", {})

    def _jobs(self, name: str, timeout: float = 120, **request: object) -> None:
        """Jobs for one plugin; its errors as PluginError."""
        try:
            errors = self._run_jobs(timeout=timeout, **request)
        except HostError as exc:
            raise PluginError(name, str(exc)) from None
        if errors:
            raise PluginError(name, f"on host {self.host.name}: {next(iter(errors.values()))}")

    def _stop_wait(self, plugins: list[_Plugin]) -> float:
        return max(2 * p.spec.stop_timeout for p in plugins) + STOP_MARGIN + self._timeout()

    # -- host up and down ----------------------------------------------------------------------
    def _host_down(self, error: HostError) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.time()
            changed = error.reason != self._down_reason
            self._down_reason, self._down_error = error.reason, str(error)
            self._retry_at = time.monotonic() + self._backoff
            delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
        if first or changed:
            log.error("waiting: %s; trying again in %gs", error, delay)

    def _host_up(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
            self._down_reason, self._down_error = "", ""
            self._backoff, self._retry_at = BACKOFF_MIN, 0.0
        if since is not None:
            log.info("reconnected: host %s (unreachable for %.0fs)", self.host.name,
                     time.time() - since)  # fmt: skip

    # -- helpers -------------------------------------------------------------------------------
    def _get(self, name: str) -> _Plugin:
        plugin = self._plugins.get(name)
        if plugin is None:
            raise NotSupervised(name)
        return plugin

    def _down_line(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._down_since or 0))
        return f'host "{self.host.name}" unreachable since {since}: {self._down_reason}'

    def _status(self, plugin: _Plugin, unit: UnitState | None) -> Status:
        spec = plugin.spec
        if plugin.error is not None and not plugin.started:
            return Status(spec.name, spec.kind, State.FAILED, None, 0, plugin.since, None, None,
                          plugin.error)  # fmt: skip
        if not plugin.started:
            if plugin.stop_requested:
                state, reason = State.STOPPED, "stopped by request (never started)"
            elif self._down_since is not None:
                state = State.FAILED
                wait = max(0.0, self._retry_at - time.monotonic())
                reason = f"{self._down_error}; retrying in {wait:.0f}s"
            else:
                state, reason = State.STARTING, f"shipping to host {self.host.name}"
            return Status(spec.name, spec.kind, state, None, 0, plugin.since, None, None, reason)
        if unit is None:
            reason = self._down_line() if self._down_since is not None else "no answer"
            return Status(spec.name, spec.kind, State.UNKNOWN, None, 0, plugin.since, None, None,
                          reason)  # fmt: skip
        if plugin.stop_requested and unit.active_state in _UP and not unit.job_id:
            plugin.stop_requested = False  # started again on the host (systemctl start)
        view = describe(unit, restart_limit=spec.restart, stop_requested=plugin.stop_requested)
        state, reason = view.state, view.reason
        if plugin.error and state in IDLE:
            state, reason = State.FAILED, plugin.error
        return Status(
            spec.name, spec.kind, state, unit.main_pid or None, view.restarts,
            unit.state_change or plugin.since, unit.exec_main_start or None, view.last_exit,
            reason, view.gave_up,
        )  # fmt: skip
