"""The one vocabulary of plugin kinds and states, shared by the loader, every backend and status.

A leaf: it imports nothing of ours, so every layer can use it.
"""

from __future__ import annotations

import enum


class Kind(enum.StrEnum):
    """What a plugin is (its manifest's PLUGIN_TYPE)."""

    CORE = "core"  # skills only, imported into the core
    INTERNAL = "internal"  # a Python process that imports the proxy
    EXTERNAL = "external"  # any command


#: Kinds that run a process of their own (handed to a supervisor).
PROCESS_KINDS = frozenset({Kind.INTERNAL, Kind.EXTERNAL})


class State(enum.StrEnum):
    """Where a plugin is in its life. The process states follow Supervisor's state machine."""

    NEW = "new"  # listed in the config, not loaded yet
    LOADED = "loaded"  # fetched and its skills registered (a core plugin stays here)
    STARTING = "starting"  # spawned, not yet up for startsecs nor reported ready
    RUNNING = "running"
    BACKOFF = "backoff"  # failed, waiting for its restart delay
    EXITED = "exited"  # exited 0 on its own: not a failure, not restarted
    FAILED = "failed"  # could not load, gave up restarting, could not spawn or be stopped
    STOPPING = "stopping"  # stop requested, waiting for the whole process tree to go
    STOPPED = "stopped"
    UNKNOWN = "unknown"  # the supervisor (systemd, a remote host) could not be asked


#: States in which a process of the plugin is expected to be alive.
ACTIVE = frozenset({State.STARTING, State.RUNNING})

#: States that count as up for ``aigisctl status NAME`` (exit 3 otherwise, as LSB says).
UP = frozenset({State.LOADED, State.STARTING, State.RUNNING})

#: States a process ends in without anything left to stop.
IDLE = frozenset({State.EXITED, State.FAILED, State.STOPPED})
