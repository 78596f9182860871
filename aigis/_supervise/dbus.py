"""A small client for systemd's manager over D-Bus (jeepney): start, stop, read unit state.

One connection, no process spawns: the status of 100 plugins is 100 cheap D-Bus calls.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from jeepney import DBusAddress, DBusErrorResponse, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection

SYSTEMD = "org.freedesktop.systemd1"
MANAGER = DBusAddress(
    "/org/freedesktop/systemd1", bus_name=SYSTEMD, interface="org.freedesktop.systemd1.Manager"
)
MANAGER_PROPS = DBusAddress(
    "/org/freedesktop/systemd1", bus_name=SYSTEMD, interface="org.freedesktop.DBus.Properties"
)
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"


class SystemdError(Exception):
    """systemd refused a request; the message is systemd's own."""


@dataclass(frozen=True)
class UnitState:
    """What systemd knows about one unit."""

    unit: str
    load_state: str
    active_state: str
    sub_state: str
    result: str
    n_restarts: int
    main_pid: int
    exec_main_status: int
    exec_main_code: int
    active_enter: float  # seconds since the epoch, 0 when never active
    state_change: float


class Systemd:
    """The system manager, reached over the system bus (or a given bus address)."""

    def __init__(self, bus: str = "SYSTEM", timeout: float = 30.0) -> None:
        self._bus = bus
        self._timeout = timeout
        self._conn: DBusConnection | None = None
        self._lock = threading.Lock()

    def _call(
        self, address: DBusAddress, method: str, signature: str | None = None, body: tuple = ()
    ) -> tuple:
        with self._lock:
            if self._conn is None:
                self._conn = open_dbus_connection(bus=self._bus)
            message = new_method_call(address, method, signature, body)
            try:
                reply = self._conn.send_and_get_reply(message, timeout=self._timeout)
            except DBusErrorResponse as exc:
                raise SystemdError(
                    f"{method}: {exc.name}: {' '.join(map(str, exc.data))}"
                ) from None
            except (OSError, ConnectionError):
                self._conn = None  # re-open on the next call
                raise
        if reply.header.message_type.name == "error":
            raise SystemdError(f"{method}: {reply.body}")
        return reply.body

    def close(self) -> None:
        """Close the bus connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- manager ---------------------------------------------------------------------------
    def reload(self) -> None:
        """``systemctl daemon-reload`` (blocks until done)."""
        self._call(MANAGER, "Reload")

    def version(self) -> int:
        """systemd's major version (e.g. 252 from "252.38-1~deb12u1")."""
        (variant,) = self._call(MANAGER_PROPS, "Get", "ss", (MANAGER.interface, "Version"))
        match = re.match(r"\d+", str(variant[1]))
        return int(match.group()) if match else 0

    def start(self, unit: str) -> None:
        """Queue a start job (mode replace)."""
        self._call(MANAGER, "StartUnit", "ss", (unit, "replace"))

    def stop(self, unit: str) -> None:
        """Queue a stop job."""
        self._call(MANAGER, "StopUnit", "ss", (unit, "replace"))

    def restart(self, unit: str) -> None:
        """Queue a restart job (resets NRestarts)."""
        self._call(MANAGER, "RestartUnit", "ss", (unit, "replace"))

    def reset_failed(self, unit: str) -> None:
        """Forget a failed state (and the start-limit counter); unknown units are ignored."""
        try:
            self._call(MANAGER, "ResetFailedUnit", "s", (unit,))
        except SystemdError as exc:
            if "NoSuchUnit" not in str(exc) and "not loaded" not in str(exc):
                raise

    def list_units(self, pattern: str) -> list[str]:
        """Names of loaded units matching a glob (``aigis-plugin@*``)."""
        (units,) = self._call(MANAGER, "ListUnitsByPatterns", "asas", ([], [pattern]))
        return [row[0] for row in units]

    def state(self, unit: str) -> UnitState:
        """Read a unit's state; an unknown unit reads as load_state "not-found"."""
        (path,) = self._call(MANAGER, "LoadUnit", "s", (unit,))
        obj = DBusAddress(path, bus_name=SYSTEMD)
        unit_props = self._get_all(obj, UNIT_IFACE)
        service = self._get_all(obj, SERVICE_IFACE) if unit.endswith(".service") else {}
        return UnitState(
            unit=unit,
            load_state=unit_props.get("LoadState", ""),
            active_state=unit_props.get("ActiveState", ""),
            sub_state=unit_props.get("SubState", ""),
            result=service.get("Result", ""),
            n_restarts=int(service.get("NRestarts", 0)),
            main_pid=int(service.get("MainPID", 0)),
            exec_main_status=int(service.get("ExecMainStatus", 0)),
            exec_main_code=int(service.get("ExecMainCode", 0)),
            active_enter=unit_props.get("ActiveEnterTimestamp", 0) / 1e6,
            state_change=unit_props.get("StateChangeTimestamp", 0) / 1e6,
        )

    def _get_all(self, obj: DBusAddress, interface: str) -> dict[str, Any]:
        props = DBusAddress(
            obj.object_path, bus_name=SYSTEMD, interface="org.freedesktop.DBus.Properties"
        )
        (values,) = self._call(props, "GetAll", "s", (interface,))
        return {key: value for key, (_sig, value) in values.items()}
