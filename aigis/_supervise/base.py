"""Supervision vocabulary shared by every backend: states, process specs, status, the protocol."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class State(enum.StrEnum):
    """Where a supervised plugin process is in its life (Supervisor's state machine)."""

    STARTING = "starting"  # spawned, not yet up for startsecs nor reported ready
    RUNNING = "running"
    BACKOFF = "backoff"  # failed, waiting for its restart delay
    EXITED = "exited"  # exited 0 on its own: not a failure, not restarted
    FAILED = "failed"  # gave up restarting, could not spawn or could not be stopped
    STOPPING = "stopping"  # stop requested, waiting for the whole process tree to go
    STOPPED = "stopped"


#: States in which a process of the plugin is expected to be alive.
ACTIVE = frozenset({State.STARTING, State.RUNNING})


@dataclass(frozen=True)
class ProcessSpec:
    """What to run for one plugin and how to supervise it; ``env`` is added to os.environ."""

    name: str
    kind: str  # "internal" | "external"
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    restart: int | None = None
    restart_delay: float = 1.0
    restart_delay_max: float = 60.0
    stop_timeout: float = 10.0
    startsecs: float = 1.0

    def __post_init__(self) -> None:
        # Checked here so a bad spec fails in add(), naming the plugin, not later in a poll().
        problems = []
        if not self.argv:
            problems.append("argv is empty")
        if self.restart is not None and self.restart < 0:
            problems.append(f"restart must be >= 0 or None, got {self.restart}")
        for key in ("restart_delay", "restart_delay_max", "stop_timeout", "startsecs"):
            if getattr(self, key) < 0:
                problems.append(f"{key} must be >= 0, got {getattr(self, key)}")
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


class Supervisor(Protocol):
    """What the daemon needs from a backend (embedded or systemd)."""

    def add(self, spec: ProcessSpec) -> None:
        """Register ``spec`` and start it."""

    def stop(self, name: str) -> Status:
        """Stop the whole process tree; blocks, bounded by stop_timeout plus the kill."""

    def start(self, name: str) -> Status:
        """Start a stopped, exited or failed plugin; resets the restart count."""

    def restart(self, name: str) -> Status:
        """Stop then start; resets the restart count."""

    def remove(self, name: str) -> None:
        """Stop and forget."""

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        """Snapshots of ``names`` (all, in registration order, when None)."""

    def poll(self) -> None:
        """Reap, transition and restart after backoff; called by the main loop every 0.1-1 s."""

    def stop_all(self, order: list[str]) -> None:
        """Stop in ``order``, then any others; nothing is restarted during or after."""

    def log_path(self, name: str) -> Path | None:
        """Where the plugin's output is logged, if the backend keeps a file."""
