"""Supervision vocabulary shared by every backend: process specs, status, the protocol."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aigis._remote.hosts import HostSpec
from aigis._settings import RESTART_DELAY, RESTART_DELAY_MAX, STOP_TIMEOUT
from aigis._states import ACTIVE, Kind, State

if TYPE_CHECKING:  # pragma: no cover
    from aigis._config import Settings

__all__ = [
    "ACTIVE",
    "LogLocation",
    "OutputCounts",
    "ProcessSpec",
    "Shipment",
    "State",
    "Status",
    "Supervisor",
]


@dataclass(frozen=True)
class Shipment:
    """What goes to a remote host before its process starts there (``aigis._remote.plan``)."""

    source: Path  # the plugin's checkout on the core's machine
    dest: str  # its copy on the host
    #: ``(path inside the plugin directory, local file)``: shipped 0400, owned by the plugin
    secrets: tuple[tuple[str, Path], ...] = ()
    #: ``(absolute path on the host, local file)``: the plugin's key, the core's certificate
    #: (0400 root's; the unit reads them as credentials)
    files: tuple[tuple[str, Path], ...] = ()
    system_requirements: tuple[str, ...] = ()
    #: ``(REQUIREMENTS_COMMAND, REQUIREMENTS_FILE or "", working directory, stamp of the
    #: inputs)`` with the host's paths, or None
    requirements: tuple[str, str, str, str] | None = None
    #: the AIGIS runtime (its package and the proxy's dependencies) is needed: internal plugins
    runtime: bool = False


@dataclass(frozen=True)
class ProcessSpec:
    """What to run for one plugin and how to supervise it; ``env`` is added to os.environ."""

    name: str
    kind: Kind  # internal | external
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    restart: int | None = None
    restart_delay: float = RESTART_DELAY
    restart_delay_max: float = RESTART_DELAY_MAX
    stop_timeout: float = STOP_TIMEOUT
    startsecs: float = 1.0
    #: The account the process runs as (None: the core's own). The systemd backend creates the
    #: plugin's own identity (``aigis._supervise.identity``) and hands it ``own_dir``.
    user: str | None = None
    #: Sandbox the process (systemd: read-only system, no capabilities, syscall filter, ...).
    sandbox: bool = False
    #: The plugin's own directory: writable by ``user``, the only part of ``hidden_dir`` it sees.
    own_dir: Path | None = None
    #: A directory whose other contents the sandboxed process must not see (the state dir).
    hidden_dir: Path | None = None
    #: ``{ENV_VAR: credential}``: env[ENV_VAR] names a file the process must read; the systemd
    #: backend passes it as a credential (LoadCredential=) instead, readable by ``user`` only.
    credentials: dict[str, str] = field(default_factory=dict)
    #: Unix sockets ``user`` must be able to connect to (the core's, for internal plugins).
    connects_to: tuple[Path, ...] = ()
    #: The remote host it runs on (None: this machine), and what goes there first.
    host: HostSpec | None = None
    shipment: Shipment | None = None

    def __post_init__(self) -> None:
        # Checked here so a bad spec fails in add(), naming the plugin, not later in a poll().
        problems = []
        if not self.argv:
            problems.append("argv is empty")
        if self.restart is not None and self.restart < 0:
            problems.append(f"restart must be >= 0 or None, got {self.restart}")
        for key in ("restart_delay", "restart_delay_max", "stop_timeout", "startsecs"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{key} must be a finite number >= 0, got {value}")
        for var in self.credentials:
            if var not in self.env:
                problems.append(f"credential {var} is not in env")
        if problems:
            raise ValueError(f'plugin "{self.name}": ' + "; ".join(problems))


@dataclass(frozen=True)
class Status:
    """A snapshot of one supervised plugin, the same shape for every backend."""

    name: str
    kind: str
    state: State
    pid: int | None
    restarts: int
    since: float  # time.time() when the current state was entered
    started_at: float | None  # when the current/last process started
    last_exit: str | None  # "exit 1", "signal 9 (SIGKILL)", "exit 0"
    reason: str  # "gave up after 2 restarts (last: exit 1)"
    gave_up: bool = False  # FAILED because the restart policy gave up (not a spawn/stop error)


@dataclass(frozen=True)
class LogLocation:
    """Where a plugin's output goes: a file the core writes, or a journal unit (never both);
    ``ssh``: the command line that runs a command on the unit's remote host (None: here)."""

    file: Path | None = None
    journal_unit: str | None = None
    ssh: tuple[str, ...] | None = None


@dataclass(frozen=True)
class OutputCounts:
    """How much one plugin printed while the core logged its output (since it was added)."""

    lines: int = 0
    dropped_bytes: int = 0  # could not be stored (a full disk): gone from the log file


class Supervisor(Protocol):
    """Everything the daemon needs from a backend. Every backend is constructed as
    ``Backend(settings, **test_hooks)``; ``aigis._supervise.pick_supervisor`` chooses one."""

    #: ``embedded`` or ``systemd``: shown by ``aigisctl`` and in the core's log.
    name: str

    def __init__(self, settings: Settings) -> None: ...

    def add(self, spec: ProcessSpec) -> None:
        """Register ``spec`` and start it, or adopt it if an earlier core left it running as is."""

    def stop(self, name: str) -> Status:
        """Stop the whole process tree; blocks, bounded by stop_timeout plus the kill."""

    def start(self, name: str) -> Status:
        """Start a stopped, exited or failed plugin; resets the restart count."""

    def restart(self, name: str) -> Status:
        """Stop then start; resets the restart count."""

    def remove(self, name: str) -> None:
        """Stop and forget; NotSupervised when ``name`` is not supervised."""

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        """Snapshots of ``names`` (all, in registration order, when None), in one round."""

    def poll(self) -> None:
        """Reap, transition and restart after backoff; called by the main loop."""

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        """Stop every plugin: the names of one step at once (in parallel), the steps in order,
        then any others; nothing is restarted during or after."""

    def retire_unknown(self, configured: Iterable[str]) -> list[str]:
        """Stop what an earlier core left running for plugins not in ``configured``; returns
        what was retired."""

    def core_restarting(self) -> bool:
        """True when the core is being restarted and plugin processes keep running for the
        next core to adopt (systemd restarting aigis.service); False otherwise."""

    def log_location(self, name: str) -> LogLocation:
        """Where ``name``'s output goes."""

    def output_counts(self) -> dict[str, OutputCounts]:
        """Per supervised plugin, the lines it printed and the bytes of them the log lost,
        when the core itself logs their output; empty when another logger does (journald)."""

    def close(self) -> None:
        """Release what the backend holds (log files, a bus connection); after stop_all."""
