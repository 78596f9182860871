"""Process supervision: one vocabulary of states, two backends, and the one place that picks."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from aigis._config import Settings
from aigis._errors import AigisError
from aigis._remote.hosts import HostSpec
from aigis._supervise.base import Supervisor

log = logging.getLogger(__name__)


def under_systemd_service() -> bool:
    """True when systemd (PID 1) started this very process as a system service, as root.

    INVOCATION_ID alone is inherited by shells inside user services and CI runners;
    SYSTEMD_EXEC_PID (systemd >= 248) names the process systemd executed.
    """
    return (
        os.geteuid() == 0
        and bool(os.environ.get("INVOCATION_ID"))
        and os.environ.get("SYSTEMD_EXEC_PID") == str(os.getpid())
        and Path("/run/systemd/system").is_dir()
    )


def pick_supervisor(
    choice: str, settings: Settings, hosts: Mapping[str, HostSpec] | None = None
) -> Supervisor:
    """The one place that picks a backend: ``auto`` (systemd when running as a systemd
    service, else embedded), ``systemd``, ``embedded``; plugins on other hosts go to that
    host's systemd whichever it is (``Router``; ``hosts``: the [hosts] table)."""
    from aigis._supervise.router import Router

    return Router(_local_supervisor(choice, settings), settings, known_hosts=hosts)


def _local_supervisor(choice: str, settings: Settings) -> Supervisor:
    """The backend for plugins on this machine."""
    if choice == "systemd" or (choice == "auto" and under_systemd_service()):
        try:
            from aigis._supervise.systemd import SystemdSupervisor
        except ImportError as exc:
            if choice == "systemd":
                raise AigisError(f"the systemd supervisor is not available: {exc}") from None
            log.warning("supervisor: systemd backend unavailable (%s); using embedded", exc)
        else:
            return SystemdSupervisor(settings)
    from aigis._supervise.embedded import EmbeddedSupervisor

    return EmbeddedSupervisor(settings)
