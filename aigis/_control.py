"""The operators' API behind ``aigisctl``: served on the control socket, never on TCP.

Every operation returns plain data (dicts, lists, str) so any client can read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aigis._errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    from aigis._daemon import Daemon


class Control:
    """Resolves control-socket calls to the daemon's operations (an allowlist)."""

    OPERATIONS = ("ping", "status", "start", "stop", "restart", "reload", "skills", "logs")

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def resolve(self, path: tuple[str, ...]) -> Callable[..., Any]:
        """The operation named by a one-element path."""
        if len(path) != 1 or path[0] not in self.OPERATIONS:
            raise AttributeError(
                f"no control operation {'.'.join(path)!r}; known: " + ", ".join(self.OPERATIONS)
            )
        return getattr(self, path[0])

    def ping(self) -> dict[str, Any]:
        """Version, pid and supervisor of the running core."""
        return self.daemon.describe()

    def status(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Status rows for ``names`` (all plugins when empty), in load order."""
        return self.daemon.status_rows(names or None)

    def _known(self, name: str) -> None:
        if name not in self.daemon.plugins:
            raise PluginError(name, f"no such plugin in {self.daemon.config.path}")

    def start(self, name: str) -> dict[str, Any]:
        """Start a stopped, exited or failed plugin (re-loading it if it failed to load)."""
        self._known(name)
        return self.daemon.start_plugin(name)

    def stop(self, name: str) -> dict[str, Any]:
        """Stop a plugin's process (core plugins cannot be stopped, only reloaded)."""
        self._known(name)
        return self.daemon.stop_plugin(name)

    def restart(self, name: str) -> dict[str, Any]:
        """Stop then start; resets the restart count."""
        self._known(name)
        return self.daemon.restart_plugin(name)

    def reload(self) -> str:
        """Re-read the config and apply the differences; returns the plan's summary."""
        return self.daemon.reload_config()

    def skills(self) -> list[dict[str, str]]:
        """Every registered skill: path, kind, owning plugin."""
        return [
            {"path": f"aigis.{s.path}", "kind": s.kind, "plugin": s.plugin}
            for s in self.daemon.namespace.skills()
        ]

    def logs(self, name: str) -> dict[str, Any]:
        """Where ``name``'s output is: ``{"file": path}`` or ``{"journal": unit}``."""
        self._known(name)
        where = self.daemon.log_location(name)
        if where.journal_unit is not None:
            return {"journal": where.journal_unit}
        return {"file": str(where.file)}
