"""``aigisctl check``: validate a config and every manifest it can reach, running nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aigis import _sources
from aigis._config import Config, load_config
from aigis._errors import AigisError, ConfigError, PluginError
from aigis._manifest import MANIFEST, own_names
from aigis._plugindir import validate_plugin
from aigis._quote import escape
from aigis._remote.hosts import HostError, HostSpec
from aigis._remote.plan import callback_line, core_address, placement
from aigis._requirements import check_system
from aigis._secrets import plan_secrets


@dataclass
class Report:
    """What ``check`` found: error lines, warning lines and info lines."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_config(path: Path, connect: bool = False) -> Report:
    """Validate the config at ``path`` and each plugin it lists, say which host runs each;
    ``connect``: also reach every remote host in use and check it can run plugins."""
    report = Report()
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.errors.extend(exc.problems)
        return report
    placed: dict[str, tuple[HostSpec, list[str]]] = {}
    for entry in config.plugins:
        host = _check_plugin(config, entry.name, entry.source, entry.table, entry.host, report)
        if host is not None:
            placed.setdefault(host.name, (host, []))[1].append(entry.name)
    for name, host in config.hosts.items():
        if name not in placed:
            report.notes.append(f'host "{name}": {_where(host)}; no plugin runs there')
    for name, (host, plugins) in placed.items():
        line = f'host "{name}": {_where(host)}; runs {", ".join(plugins)}'
        with contextlib.suppress(ValueError):  # (reported with each internal plugin there)
            line += f"; {callback_line(host, config.settings.tcp)}"
        report.notes.append(line)
    if connect and placed:
        _connect(config, [host for host, _ in placed.values()], report)
    return report


def _where(host: HostSpec) -> str:
    user = f"{host.user}@" if host.user else ""
    return f"ssh {user}{host.address} port {host.port}, {host.python}"


def _connect(config: Config, hosts: list[HostSpec], report: Report) -> None:
    """Reach every host (in parallel) and check python, systemd and free space there."""
    from aigis._remote.ssh import Master, check_all
    from aigis._remote.supervisor import ssh_settings

    masters = [Master(host, ssh_settings(config.settings)) for host in hosts]
    try:
        for name, found in check_all(masters).items():
            if isinstance(found, HostError):
                report.errors.append(str(found))
            else:
                free = found.free_bytes / 1e9
                report.notes.append(
                    f'host "{name}": reachable: python {found.python}, systemd {found.systemd}, '
                    f"{free:.1f} GB free under /var/lib"
                )
    finally:
        for master in masters:
            with contextlib.suppress(HostError):
                master.close()


def _check_plugin(
    config: Config, name: str, source: str, table: str, override: str | None, report: Report
) -> HostSpec | None:
    """Find the plugin's files (fetched copy, else local source) and validate them; the remote
    host it runs on, if any."""
    prefix = f'plugin "{name}"'
    fetched = config.settings.plugins_dir / name
    base = config.path.parent
    if fetched.is_dir():
        root = fetched
    elif _sources.is_local_source(source, base):
        root = (base / Path(source).expanduser()).resolve()
    else:
        report.notes.append(
            escape(f"{prefix}: not fetched yet from {source}; manifest not checked")
        )
        return None
    checked = validate_plugin(root, name, table)
    report.errors.extend(f"{prefix}: {problem}" for problem in checked.errors)
    report.warnings.extend(f"{prefix}: {w}" for w in checked.warnings)
    manifest = checked.manifest
    if manifest is None:
        return None
    origin = root / MANIFEST
    host: HostSpec | None = None
    if not checked.errors:  # (a bad manifest's own problems are reported already)
        try:
            host = placement(
                name, manifest.plugin_type, override, manifest.host, config.hosts, own_names()
            )
        except PluginError as exc:
            report.errors.append(str(exc))
            return None
    if host is not None and manifest.plugin_type == "internal":
        try:
            core_address(host, config.settings.tcp)
        except ValueError as exc:
            report.errors.append(f"{prefix}: {exc}")
    steps: list[Callable[[], object]] = [
        lambda: plan_secrets(name, manifest.secrets, config.settings.secrets_dir, root)
    ]
    if host is None:  # a remote host's own PATH is checked there, at start
        steps.append(lambda: check_system(name, manifest.system_requirements, str(origin)))
    for step in steps:
        try:
            step()
        except PluginError as exc:
            report.errors.append(str(exc))
        except AigisError as exc:  # pragma: no cover - every step raises PluginError today
            report.errors.append(f"{prefix}: {exc}")
    if not any(e.startswith(prefix) for e in report.errors):
        where = f", on host {host.name}" if host is not None else ""
        report.notes.append(f"{prefix}: ok ({manifest.plugin_type}, {root}{where})")
    return host
