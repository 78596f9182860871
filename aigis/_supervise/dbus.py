"""A small client for systemd's manager over D-Bus (jeepney): jobs, reloads, unit state.

One connection, no process spawns: the states of many units are read with one pipelined batch of
calls, so the status of 100 plugins costs tens of milliseconds, not 100 ``systemctl`` runs.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message

from aigis._supervise.unitstate import UnitState

SYSTEMD = "org.freedesktop.systemd1"
MANAGER = DBusAddress(
    "/org/freedesktop/systemd1", bus_name=SYSTEMD, interface="org.freedesktop.systemd1.Manager"
)
PROPERTIES = "org.freedesktop.DBus.Properties"
WINDOW = 100  # calls in flight at once: dbus-daemon allows 128 pending replies per connection
#: Unfinished jobs of ours at once: systemd holds one match rule per job on its bus connection
#: (dbus-daemon allows 512 per connection, shared with every other client's jobs).
MAX_JOBS = 200
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"

Call = tuple[DBusAddress, str, str | None, tuple]


class SystemdError(Exception):
    """systemd refused a request; ``name`` is the D-Bus error name, the message systemd's own."""

    def __init__(self, method: str, name: str, text: str) -> None:
        self.name = name
        super().__init__(f"{method}: {text} ({name})")


#: Errors of ResetFailedUnit that mean there was nothing to reset.
_UNKNOWN_UNIT = ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.LoadFailed")


def unit_path(unit: str) -> str:
    """The D-Bus object path of ``unit`` (sd-bus label escaping); systemd loads it on access."""
    out = []
    for index, char in enumerate(unit):
        if char.isascii() and (char.isalpha() or (char.isdigit() and index > 0)):
            out.append(char)
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode())
    return UNIT_PREFIX + ("".join(out) or "_")


class Systemd:
    """The system manager, reached over the system bus (or a given bus address)."""

    def __init__(self, bus: str = "SYSTEM", timeout: float = 30.0) -> None:
        self.bus = bus
        self._timeout = timeout
        self._conn: DBusConnection | None = None
        self._lock = threading.Lock()
        #: unit -> ((InvocationID, ActiveState, SubState), the ``_PROPERTIES`` read then) of
        #: units running without a job: unchanged until the unit starts again or moves.
        self._running: dict[str, tuple[tuple[str, str, str], dict[str, Any]]] = {}

    def _call_many(self, calls: Sequence[Call]) -> list[Message]:
        """Send the calls pipelined, at most WINDOW awaiting replies (the bus daemon refuses more
        pending replies per connection), and return the replies in order; errors come back as
        error messages."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = open_dbus_connection(bus=self.bus)
                conn = self._conn
                serials: list[int] = []
                wanted: set[int] = set()
                replies: dict[int, Message] = {}
                deadline = time.monotonic() + self._timeout
                for address, method, signature, body in calls:
                    while len(serials) - len(replies) >= WINDOW:
                        self._receive(conn, wanted, replies, deadline)
                    serial = next(conn.outgoing_serial)
                    serials.append(serial)
                    wanted.add(serial)
                    conn.send_message(new_method_call(address, method, signature, body), serial)
                while len(replies) < len(serials):
                    self._receive(conn, wanted, replies, deadline)
            except OSError:  # ConnectionError, TimeoutError too
                self._drop()  # a late reply must not be taken for the answer to a later call
                raise
        return [replies[serial] for serial in serials]

    def _receive(
        self, conn: DBusConnection, wanted: set[int], replies: dict[int, Message], deadline: float
    ) -> None:
        """Wait for the next message; keep it if it answers one of the ``wanted`` serials."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"systemd did not answer within {self._timeout:g}s")
        message = conn.receive(timeout=left)
        serial = message.header.fields.get(HeaderFields.reply_serial, -1)
        if serial in wanted:
            replies[serial] = message

    def _call(
        self, address: DBusAddress, method: str, signature: str | None = None, body: tuple = ()
    ) -> tuple:
        (reply,) = self._call_many([(address, method, signature, body)])
        return _body(method, reply)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the bus connection."""
        with self._lock:
            self._drop()

    # -- manager ---------------------------------------------------------------------------
    def reload(self) -> None:
        """``systemctl daemon-reload`` (blocks until done)."""
        self._running.clear()  # Restart=, StartLimitBurst=, NeedDaemonReload may change
        self._call(MANAGER, "Reload")

    def version(self) -> int:
        """systemd's major version (e.g. 252 from "252.38-1~deb12u1")."""
        props = DBusAddress(MANAGER.object_path, bus_name=SYSTEMD, interface=PROPERTIES)
        ((_sig, value),) = self._call(props, "Get", "ss", (MANAGER.interface, "Version"))
        match = re.match(r"\d+", str(value))
        return int(match.group()) if match else 0

    def start(self, unit: str) -> str:
        """Queue a start job (mode replace); returns the job's object path."""
        return self._call(MANAGER, "StartUnit", "ss", (unit, "replace"))[0]

    def stop(self, unit: str) -> str:
        """Queue a stop job; returns the job's object path."""
        return self._call(MANAGER, "StopUnit", "ss", (unit, "replace"))[0]

    def restart(self, unit: str) -> str:
        """Queue a restart job (resets NRestarts); returns the job's object path."""
        return self._call(MANAGER, "RestartUnit", "ss", (unit, "replace"))[0]

    def reset_failed(self, unit: str) -> None:
        """Forget a failed state, NRestarts and the start-limit counter; unknown units are fine."""
        try:
            self._call(MANAGER, "ResetFailedUnit", "s", (unit,))
        except SystemdError as exc:
            if exc.name not in _UNKNOWN_UNIT:
                raise

    def ref(self, units: Sequence[str]) -> None:
        """Reference ``units`` on this connection, so systemd keeps them in memory when they
        end (a clean exit stays readable) until the connection closes. Each reference costs one
        of the 512 match rules dbus-daemon allows systemd's connection: the local backend keeps
        exit records instead; a remote host's supervisor, which reads over this bus, uses it."""
        self._call_many([(MANAGER, "RefUnit", "s", (unit,)) for unit in units])

    def jobs(self, jobs: Sequence[tuple[str, str]]) -> dict[str, SystemdError | None]:
        """Many ``(unit, how)`` in one pipelined batch: ``how`` is start, restart or stop (a job,
        mode replace); units that start have their failed state reset first. Returns each
        unit's error, or None. systemd adds a match rule to its bus connection for every job
        a client queued until the job finishes (dbus-daemon allows 512): callers queue a few
        hundred at a time (``MAX_JOBS``)."""
        method = {"start": "StartUnit", "restart": "RestartUnit", "stop": "StopUnit"}
        calls: list[Call] = []
        plan: list[tuple[str, str]] = []  # (unit, what) of each call, in order
        for unit, how in jobs:
            if how in ("start", "restart"):
                calls.append((MANAGER, "ResetFailedUnit", "s", (unit,)))
                plan.append((unit, "reset"))
            calls.append((MANAGER, method[how], "ss", (unit, "replace")))
            plan.append((unit, how))
        errors: dict[str, SystemdError | None] = {unit: None for unit, _ in jobs}
        for (unit, what), reply in zip(plan, self._call_many(calls)):
            try:
                _body(what, reply)
            except SystemdError as exc:
                if what == "reset" and exc.name in _UNKNOWN_UNIT:
                    continue  # nothing failed to forget
                errors[unit] = errors[unit] or exc
        return errors

    def brief(self, units: Sequence[str]) -> dict[str, tuple[str, str, int]]:
        """``{unit: (ActiveState, SubState, job id)}`` of many units in one call."""
        (rows,) = self._call(MANAGER, "ListUnitsByNames", "as", (list(units),))
        return {row[0]: (row[3], row[4], int(row[7])) for row in rows}

    def job_type(self, unit: str) -> str:
        """The type of the job running or queued for ``unit`` ("restart", "stop", …), or ""."""
        (rows,) = self._call(MANAGER, "ListUnitsByNames", "as", ([unit],))
        return str(rows[0][8]) if rows and int(rows[0][7]) else ""

    def unit_of_pid(self, pid: int) -> str:
        """The name of the unit process ``pid`` belongs to (e.g. ``aigis.service``)."""
        (path,) = self._call(MANAGER, "GetUnitByPID", "u", (pid,))
        props = DBusAddress(path, bus_name=SYSTEMD, interface=PROPERTIES)
        ((_sig, value),) = self._call(props, "Get", "ss", ("org.freedesktop.systemd1.Unit", "Id"))
        return str(value)

    def list_units(self, pattern: str) -> list[str]:
        """Names of loaded units matching a glob (``aigis-plugin@*``)."""
        (units,) = self._call(MANAGER, "ListUnitsByPatterns", "asas", ([], [pattern]))
        return [row[0] for row in units]

    def state(self, unit: str) -> UnitState:
        """Read one unit's state; an unknown unit reads as load_state "not-found"."""
        return self.states([unit])[0]

    def states(self, units: Sequence[str], fresh: bool = False) -> list[UnitState]:
        """Read many units at once: one ListUnitsByNames, then pipelined Get calls for the few
        properties we need (a GetAll of ~300 properties is slower to parse). A unit that
        runs without a job and whose InvocationID, ActiveState and SubState are those of an
        earlier read costs one Get (its InvocationID), not eleven: its main process, start
        time and restart count cannot have changed. ``fresh``: read everything anew."""
        if not units:
            return []
        (rows,) = self._call(MANAGER, "ListUnitsByNames", "as", (list(units),))
        listed = {row[0]: row for row in rows}
        row_of = {
            u: listed.get(u, (u, "", "not-found", "inactive", "dead", "", "", 0)) for u in units
        }
        running = {u for u, row in row_of.items() if (row[3], row[4], int(row[7])) == _RUNNING}
        known = [u for u in units if u in running and u in self._running and not fresh]
        props: dict[str, dict[str, Any]] = {}
        if known:  # one Get each: the invocation tells whether the cached read still holds
            ids = self.unit_properties(known, ["InvocationID"], interface="Unit")
            for unit in known:
                key, cached = self._running[unit]
                value = ids.get(unit, {}).get("InvocationID")
                if value is not None and key == (bytes(value).hex(), *row_of[unit][3:5]):
                    props[unit] = cached
        rest = [u for u in units if u not in props]
        # A running unit has no exit status, and its restart policy matters only once it fails.
        wanted = {
            u: _PROPERTIES if fresh or u not in running else _RUNNING_PROPERTIES for u in rest
        }
        calls: list[Call] = [
            (
                DBusAddress(unit_path(unit), bus_name=SYSTEMD, interface=PROPERTIES),
                "Get",
                "ss",
                (f"org.freedesktop.systemd1.{interface}", name),
            )
            for unit in rest
            for interface, name in wanted[unit]
        ]
        replies = iter(self._call_many(calls) if calls else [])
        for unit in rest:
            read = {name: _body("Get", next(replies))[0][1] for _, name in wanted[unit]}
            props[unit] = {**_UNREAD, **read}
            if unit in running:
                invocation = bytes(props[unit]["InvocationID"]).hex()
                self._running[unit] = ((invocation, *row_of[unit][3:5]), props[unit])
            else:
                self._running.pop(unit, None)
        return [_unit_state(unit, row_of[unit], props[unit]) for unit in units]

    def unit_properties(
        self, units: Sequence[str], names: Sequence[str], interface: str = "Service"
    ) -> dict[str, dict[str, Any]]:
        """``{unit: {property: value}}`` of ``names`` (properties of
        ``org.freedesktop.systemd1.<interface>``) for many units, in one pipelined batch; a
        property systemd cannot give (unknown unit) is left out."""
        calls: list[Call] = [
            (
                DBusAddress(unit_path(unit), bus_name=SYSTEMD, interface=PROPERTIES),
                "Get",
                "ss",
                (f"org.freedesktop.systemd1.{interface}", name),
            )
            for unit in units
            for name in names
        ]
        replies = iter(self._call_many(calls))
        out: dict[str, dict[str, Any]] = {}
        for unit in units:
            for name in names:
                reply = next(replies)
                if reply.header.message_type is not MessageType.error:
                    out.setdefault(unit, {})[name] = reply.body[0][1]
        return out


#: (ActiveState, SubState, job id) of a unit whose state ``states`` may keep between reads.
_RUNNING = ("active", "running", 0)
#: What ``states`` reads besides ListUnitsByNames' LoadState, ActiveState, SubState and job.
_PROPERTIES = (
    ("Unit", "InvocationID"),
    ("Unit", "StateChangeTimestamp"),
    ("Unit", "NeedDaemonReload"),
    ("Unit", "StartLimitBurst"),
    ("Service", "Result"),
    ("Service", "Type"),
    ("Service", "Restart"),
    ("Service", "NRestarts"),
    ("Service", "MainPID"),
    ("Service", "ExecMainStatus"),
    ("Service", "ExecMainCode"),
    ("Service", "ExecMainStartTimestamp"),
)


#: What ``states`` reads of a unit that runs without a job (the rest as in ``_UNREAD``).
_RUNNING_PROPERTIES = (
    ("Unit", "InvocationID"),
    ("Unit", "StateChangeTimestamp"),
    ("Service", "Type"),
    ("Service", "NRestarts"),
    ("Service", "MainPID"),
    ("Service", "ExecMainStartTimestamp"),
)
#: Values of the properties ``states`` did not read (a running unit's exit status is empty).
_UNREAD: dict[str, Any] = {
    "NeedDaemonReload": False,
    "StartLimitBurst": 0,
    "Result": "success",
    "Restart": "",
    "ExecMainStatus": 0,
    "ExecMainCode": 0,
}


def _body(method: str, reply: Message) -> tuple:
    """The reply's body, or SystemdError for an error reply."""
    if reply.header.message_type is MessageType.error:
        name = reply.header.fields.get(HeaderFields.error_name, "unknown")
        text = str(reply.body[0]) if reply.body else name
        raise SystemdError(method, name, text)
    return reply.body


def _unit_state(unit: str, row: tuple, props: dict[str, Any]) -> UnitState:
    """A UnitState from a ListUnitsByNames row and the ``_PROPERTIES`` values."""
    return UnitState(
        unit=unit,
        load_state=row[2],
        active_state=row[3],
        sub_state=row[4],
        result=props["Result"],
        service_type=props["Type"],
        restart=props["Restart"],
        n_restarts=int(props["NRestarts"]),
        start_limit_burst=int(props["StartLimitBurst"]),
        main_pid=int(props["MainPID"]),
        exec_main_status=int(props["ExecMainStatus"]),
        exec_main_code=int(props["ExecMainCode"]),
        exec_main_start=props["ExecMainStartTimestamp"] / 1e6,
        state_change=props["StateChangeTimestamp"] / 1e6,
        job_id=int(row[7]),
        need_reload=bool(props["NeedDaemonReload"]),
    )
