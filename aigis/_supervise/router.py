"""The Supervisor the daemon talks to: each plugin to the local backend or its host's.

A plugin whose ProcessSpec names a ``host`` goes to that host's ``RemoteSupervisor`` (made on
first use, one per host); every other to the local backend (embedded or systemd). Calls that
span plugins (status, stop_all, retire_unknown) reach every backend at once, in parallel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aigis._config import Settings
from aigis._errors import NotSupervised, PluginError
from aigis._remote.hosts import HostSpec
from aigis._supervise.base import LogLocation, OutputCounts, ProcessSpec, Status, Supervisor

log = logging.getLogger(__name__)

LOCAL = ""  # the key of the local backend


class Router:
    """Implements the Supervisor protocol over the local backend and one per remote host."""

    def __init__(
        self,
        local: Supervisor,
        settings: Settings,
        *,
        remote: Callable[[HostSpec], Supervisor] | None = None,
        known_hosts: Mapping[str, HostSpec] | None = None,
    ) -> None:
        self.local = local
        #: The [hosts] table: at start-up, units left there by an earlier core are retired even
        #: on a host none of this config's plugins use (a plugin moved while the core was down).
        self.known_hosts = dict(known_hosts or {})
        self.name = local.name
        self.settings = settings
        self._make_remote = remote or self._remote_supervisor
        self.hosts: dict[str, Supervisor] = {}  # host name -> its supervisor
        self._specs: dict[str, HostSpec] = {}
        self._where: dict[str, str] = {}  # plugin -> LOCAL or its host's name

    def _remote_supervisor(self, host: HostSpec) -> Supervisor:
        from aigis._remote.supervisor import RemoteSupervisor

        return RemoteSupervisor(host, self.settings)

    def _backend(self, key: str) -> Supervisor:
        return self.local if key == LOCAL else self.hosts[key]

    def _of(self, name: str) -> Supervisor:
        key = self._where.get(name)
        if key is None:
            raise NotSupervised(name)
        return self._backend(key)

    def host_of(self, name: str) -> str | None:
        """The host plugin ``name`` runs on (None: here, or not supervised)."""
        return self._where.get(name) or None

    # -- the Supervisor protocol ---------------------------------------------------------------
    def add(self, spec: ProcessSpec) -> None:
        if spec.name in self._where:
            raise PluginError(spec.name, "already supervised (remove it before adding again)")
        if spec.host is None:
            self.local.add(spec)
            self._where[spec.name] = LOCAL
            return
        host = spec.host
        if host.name in self.hosts and self._specs[host.name] != host:
            busy = [n for n, k in self._where.items() if k == host.name]
            if busy:
                raise PluginError(
                    spec.name,
                    f'host "{host.name}" changed in the config while {", ".join(busy)} run '
                    "there; restart AIGIS to apply it",
                )
            self.hosts.pop(host.name).close()
        if host.name not in self.hosts:
            self.hosts[host.name] = self._make_remote(host)
            self._specs[host.name] = host
        self.hosts[host.name].add(spec)
        self._where[spec.name] = host.name

    def start(self, name: str) -> Status:
        return self._of(name).start(name)

    def stop(self, name: str) -> Status:
        return self._of(name).stop(name)

    def restart(self, name: str) -> Status:
        return self._of(name).restart(name)

    def remove(self, name: str) -> None:
        self._of(name).remove(name)
        self._where.pop(name, None)

    def status(self, names: Iterable[str] | None = None) -> list[Status]:
        """Every backend's snapshots in one parallel round, in the order asked."""
        wanted = list(self._where) if names is None else list(names)
        groups: dict[str, list[str]] = {}
        for name in wanted:
            key = self._where.get(name)
            if key is None:
                raise NotSupervised(name)
            groups.setdefault(key, []).append(name)
        found: dict[str, Status] = {}
        results = self._each(list(groups), lambda key: self._backend(key).status(groups[key]))
        for outcome in results.values():
            if isinstance(outcome, BaseException):
                raise outcome
            found.update((s.name, s) for s in outcome)
        return [found[name] for name in wanted]

    def poll(self) -> None:
        self.local.poll()
        for backend in list(self.hosts.values()):
            backend.poll()

    def stop_all(self, steps: Sequence[Sequence[str]]) -> None:
        """Every backend stops its plugins at once (each in step order)."""
        by_key: dict[str, list[list[str]]] = {}
        for key in [LOCAL, *self.hosts]:
            by_key[key] = [[n for n in step if self._where.get(n) == key] for step in steps]
        results = self._each(list(by_key), lambda key: self._backend(key).stop_all(by_key[key]))
        for key, outcome in results.items():
            if isinstance(outcome, BaseException):
                log.error("failed: stopping the plugins of %s: %s", key or "this host", outcome)

    def retire_unknown(self, configured: Iterable[str]) -> list[str]:
        """Locally as the backend does; on each host, units of plugins it does not run now
        (except configured plugins not supervised anywhere: not loaded, or failed to)."""
        configured = list(configured)
        for name, host in self.known_hosts.items():
            if name not in self.hosts:
                self.hosts[name] = self._make_remote(host)
                self._specs[name] = host
        local = [n for n in configured if self._where.get(n, LOCAL) == LOCAL]
        unplaced = [n for n in configured if n not in self._where]
        retired = list(self.local.retire_unknown(local))
        results = self._each(list(self.hosts), lambda k: self.hosts[k].retire_unknown(unplaced))
        for outcome in results.values():
            if not isinstance(outcome, BaseException):
                retired += outcome
        return retired

    def core_restarting(self) -> bool:
        return self.local.core_restarting()

    def log_location(self, name: str) -> LogLocation:
        return self._of(name).log_location(name)

    def output_counts(self) -> dict[str, OutputCounts]:
        """The local backend's counts (a remote plugin's output is its host's journal's)."""
        return self.local.output_counts()

    def close(self) -> None:
        self._each([LOCAL, *self.hosts], lambda key: self._backend(key).close())

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _each(keys: list[str], action: Callable[[str], Any]) -> dict[str, Any]:
        """``action(key)`` for every key in parallel; each result or the exception it raised."""

        def one(key: str) -> Any:
            try:
                return action(key)
            except Exception as exc:
                return exc

        if len(keys) <= 1:
            return {key: one(key) for key in keys}
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            return dict(zip(keys, pool.map(one, keys), strict=True))
