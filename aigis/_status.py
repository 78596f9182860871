"""Status rows, the one producer: what ``aigisctl status --json`` shows about a plugin, built from
the core's plugin and its supervisor's snapshot, or from a unit when the core is down (pure)."""

from __future__ import annotations

import time
from typing import Any, Protocol

from aigis._redact import redact
from aigis._states import Kind, State
from aigis._supervise.base import Status
from aigis._supervise.units import plugin_of_unit
from aigis._supervise.unitstate import UnitState, describe

#: The fields of every status row, in order; documented in the README (``status --json``).
STATUS_FIELDS = (
    "name",
    "type",
    "state",
    "pid",
    "restarts",
    "uptime",
    "since",
    "cpu_seconds",
    "memory_bytes",
    "host",
    "source",
    "ref",
    "commit",
    "last_exit",
    "reason",
)

Row = dict[str, Any]

#: systemd's Type= of a plugin unit -> the plugin kind (the drop-ins set one per kind).
_KIND_OF_SERVICE_TYPE = {"notify": Kind.INTERNAL, "exec": Kind.EXTERNAL}


class PluginFacts(Protocol):
    """What the core knows of a plugin (``aigis._loader.Plugin`` has these)."""

    @property
    def name(self) -> str: ...
    @property
    def plugin_type(self) -> str: ...
    @property
    def host(self) -> str: ...

    state: State
    reason: str
    loaded_at: float
    commit: str | None
    supervised: bool

    @property
    def source(self) -> str: ...
    @property
    def ref(self) -> str | None: ...


class Usage(Protocol):
    """What a plugin's processes cost (``aigis._supervise.usage.Usage`` has these)."""

    @property
    def cpu_seconds(self) -> float: ...
    @property
    def memory_bytes(self) -> int: ...


def _row(**values: Any) -> Row:
    """A row with exactly STATUS_FIELDS, in order."""
    assert values.keys() == set(STATUS_FIELDS), sorted(values.keys() ^ set(STATUS_FIELDS))
    return {key: values[key] for key in STATUS_FIELDS}


def plugin_row(
    plugin: PluginFacts,
    proc: Status | None,
    now: float | None = None,
    usage: Usage | None = None,
) -> Row:
    """One plugin's row: the core's view, with the supervisor's snapshot when it has a process
    and what that process costs (``usage``: CPU seconds and memory; null when not read).

    A supervised plugin without a snapshot is ``unknown`` (the supervisor could not be asked).
    """
    now = time.time() if now is None else now
    state, reason = State(plugin.state), plugin.reason
    if state is State.NEW:  # listed, being loaded or waiting for its turn (start-up)
        state = State.STARTING
    pid, restarts, last_exit = None, 0, None
    since: float | None = plugin.loaded_at or None
    uptime = None
    if state is State.LOADED and plugin.loaded_at:
        uptime = max(0.0, now - plugin.loaded_at)
    if proc is not None:
        state, pid, restarts = proc.state, proc.pid, proc.restarts
        since, last_exit, reason = proc.since, proc.last_exit, proc.reason
        uptime = max(0.0, now - proc.started_at) if proc.started_at and proc.pid else None
    elif plugin.supervised:
        state, reason = State.UNKNOWN, "the supervisor could not report this plugin's state"
    return _row(
        name=plugin.name,
        type=str(plugin.plugin_type),
        state=str(state),
        pid=pid,
        restarts=restarts,
        uptime=uptime,
        since=since,
        cpu_seconds=None if usage is None else round(usage.cpu_seconds, 3),
        memory_bytes=None if usage is None else usage.memory_bytes,
        host=plugin.host,
        source=redact(plugin.source),
        ref=plugin.ref,
        commit=plugin.commit,
        last_exit=last_exit,
        reason=redact(reason),
    )


def unit_row(unit: UnitState, now: float | None = None, usage: Usage | None = None) -> Row:
    """The row of a plugin unit read from systemd while the core is down: the core's own facts
    (host, source, ref, commit) are unknown, so null; ``usage`` from the unit's cgroup."""
    now = time.time() if now is None else now
    view = describe(unit, restart_limit=None, stop_requested=False)
    reason = view.reason if unit.load_state == "loaded" else f"{unit.unit} {unit.load_state}"
    started = unit.exec_main_start if unit.main_pid else None
    kind = _KIND_OF_SERVICE_TYPE.get(unit.service_type, unit.service_type or "-")
    return _row(
        name=plugin_of_unit(unit.unit) or unit.unit,
        type=str(kind),
        state=str(view.state),
        pid=unit.main_pid or None,
        restarts=view.restarts,
        uptime=max(0.0, now - started) if started else None,
        since=unit.state_change or None,
        cpu_seconds=None if usage is None else round(usage.cpu_seconds, 3),
        memory_bytes=None if usage is None else usage.memory_bytes,
        host=None,
        source=None,
        ref=None,
        commit=None,
        last_exit=view.last_exit,
        reason=reason,
    )


def summary(rows: list[Row]) -> str:
    """One line: plugin counts per state, e.g. ``1 failed, 1 loaded, 2 running``."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    parts = [f"{n} {state}" for state, n in sorted(counts.items())]
    return ", ".join(parts) if parts else "no plugins configured"
