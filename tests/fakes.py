"""A recording FakeSupervisor: the daemon's unit tests hand it in place of a real backend."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from aigis._config import Settings
from aigis._errors import NotSupervised, PluginError
from aigis._states import IDLE, State
from aigis._supervise.base import LogLocation, OutputCounts, ProcessSpec, Status

#: What happened, in order, across the fake and the plugins' cleanups (``cleanup NAME``).
EVENTS: list[str] = []


class FakeSupervisor:
    """Implements the Supervisor protocol in memory: every call is recorded in EVENTS.

    ``running``: units an earlier core left running (adopted by add, retired if unlisted);
    ``refuse_remove``: names whose processes cannot be stopped; ``restarting``: what
    core_restarting answers.
    """

    name = "fake"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        running: Iterable[str] = (),
        refuse_remove: Iterable[str] = (),
        restarting: bool = False,
    ) -> None:
        self.specs: dict[str, ProcessSpec] = {}
        self.states: dict[str, State] = {}
        self.pids: dict[str, int] = {name: 1000 + i for i, name in enumerate(running)}
        self.refuse_remove = set(refuse_remove)
        self.restarting = restarting
        self.halting = False
        self._next_pid = 2000
        self.outputs: dict[str, OutputCounts] = {}  # what output_counts answers

    def _record(self, *words: object) -> None:
        EVENTS.append(" ".join(map(str, words)))

    def _get(self, name: str) -> ProcessSpec:
        if name not in self.specs:
            raise NotSupervised(name)
        return self.specs[name]

    def add(self, spec: ProcessSpec) -> None:
        if self.halting:
            raise PluginError(spec.name, "not started: all plugins are being stopped")
        if spec.name in self.specs:
            raise PluginError(spec.name, "already supervised (remove it before adding again)")
        self.specs[spec.name] = spec
        self.states[spec.name] = State.RUNNING
        if spec.name in self.pids:
            self._record("adopt", spec.name, self.pids[spec.name])
        else:
            self._next_pid += 1
            self.pids[spec.name] = self._next_pid
            self._record("add", spec.name)

    def stop(self, name: str) -> Status:
        self._get(name)
        if name in self.refuse_remove:
            self.states[name] = State.FAILED
            raise PluginError(name, "could not stop: pid 1 survived SIGKILL")
        self.states[name] = State.STOPPED
        self._record("stop", name)
        return self.status([name])[0]

    def start(self, name: str) -> Status:
        self._get(name)
        self.states[name] = State.RUNNING
        self._record("start", name)
        return self.status([name])[0]

    def restart(self, name: str) -> Status:
        self._get(name)
        self._record("restart", name)
        return self.start(name)

    def remove(self, name: str) -> None:
        self._get(name)
        if name in self.refuse_remove:
            raise PluginError(name, "could not stop: pid 1 survived SIGKILL")
        del self.specs[name]
        self.states.pop(name, None)
        self.pids.pop(name, None)
        self._record("remove", name)

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        wanted = list(self.specs) if names is None else list(names)
        now = time.time()
        out = []
        for name in wanted:
            spec = self._get(name)
            state = self.states[name]
            pid = self.pids.get(name) if state not in IDLE else None
            out.append(Status(name, spec.kind, state, pid, 0, now, now, None, str(state)))
        return out

    def poll(self) -> None:
        pass

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        self.halting = True
        named = [n for step in steps for n in step]
        rest = [n for n in reversed(self.specs) if n not in named]
        for step in [*steps, rest]:
            if step:
                self._record("stop_all", ",".join(step))
                for name in step:
                    self.states[name] = State.STOPPED

    def retire_unknown(self, configured: Iterable[str]) -> list[str]:
        known = set(configured) | set(self.specs)
        retired = [name for name in self.pids if name not in known]
        for name in retired:
            del self.pids[name]
            self._record("retire", name)
        return retired

    def core_restarting(self) -> bool:
        return self.restarting

    def log_location(self, name: str) -> LogLocation:
        return LogLocation(file=Path("/nonexistent") / f"{name}.log")

    def output_counts(self) -> dict[str, OutputCounts]:
        return dict(self.outputs)

    def close(self) -> None:
        self._record("close")
