"""``aigisctl check``: validate a config and every manifest it can reach, running nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aigis import _sources
from aigis._config import Config, load_config
from aigis._errors import AigisError, ConfigError, PluginError
from aigis._manifest import MANIFEST
from aigis._plugindir import validate_plugin
from aigis._quote import escape
from aigis._requirements import check_system
from aigis._secrets import plan_secrets


@dataclass
class Report:
    """What ``check`` found: error lines, warning lines and info lines."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_config(path: Path) -> Report:
    """Validate the config at ``path`` and each plugin it lists."""
    report = Report()
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.errors.extend(exc.problems)
        return report
    for entry in config.plugins:
        _check_plugin(config, entry.name, entry.source, entry.table, report)
    return report


def _check_plugin(config: Config, name: str, source: str, table: str, report: Report) -> None:
    """Find the plugin's files (fetched copy, else local source) and validate them."""
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
        return
    checked = validate_plugin(root, name, table)
    report.errors.extend(f"{prefix}: {problem}" for problem in checked.errors)
    report.warnings.extend(f"{prefix}: {w}" for w in checked.warnings)
    manifest = checked.manifest
    if manifest is None:
        return
    origin = root / MANIFEST
    for step in (
        lambda: check_system(name, manifest.system_requirements, str(origin)),
        lambda: plan_secrets(name, manifest.secrets, config.settings.secrets_dir, root),
    ):
        try:
            step()
        except PluginError as exc:
            report.errors.append(str(exc))
        except AigisError as exc:  # pragma: no cover - every step raises PluginError today
            report.errors.append(f"{prefix}: {exc}")
    if not any(e.startswith(prefix) for e in report.errors):
        report.notes.append(f"{prefix}: ok ({manifest.plugin_type}, {root})")
