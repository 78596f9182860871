"""Live config reload, the pure half: what changed between two configs.

``diff(old, new)`` only compares; the daemon applies the plan (start, stop, reload).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

from aigis._config import Config, PluginEntry


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: plugins to add, remove, reload, keep; settings needing a restart."""

    added: tuple[PluginEntry, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[PluginEntry, ...] = ()
    unchanged: tuple[str, ...] = ()
    settings_changed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when applying the plan would touch nothing."""
        return not (self.added or self.removed or self.changed)

    def describe(self) -> str:
        """One line for the log: ``2 added (a, b), 1 removed (c), 5 unchanged``."""
        parts = []
        for label, names in (
            ("added", [e.name for e in self.added]),
            ("removed", list(self.removed)),
            ("changed", [e.name for e in self.changed]),
        ):
            if names:
                parts.append(f"{len(names)} {label} ({', '.join(names)})")
        parts.append(f"{len(self.unchanged)} unchanged")
        return ", ".join(parts)


def _what_runs(entry: PluginEntry) -> tuple:
    """What a change of reloads the plugin: its source, the privileges the operator grants and
    the host it runs on."""
    return entry.source, entry.ref, entry.user, entry.sandbox, entry.host


def diff(old: Config, new: Config, retry: Iterable[str] = ()) -> ReloadPlan:
    """Compare configs; plugins named in ``retry`` (e.g. failed ones) count as changed."""
    retry = set(retry)
    before = {p.name: p for p in old.plugins}
    after = {p.name: p for p in new.plugins}
    added, changed, unchanged = [], [], []
    for entry in new.plugins:
        previous = before.get(entry.name)
        if previous is None:
            added.append(entry)
        elif _what_runs(previous) != _what_runs(entry) or entry.name in retry:
            changed.append(entry)
        else:
            unchanged.append(entry.name)
    # Removal runs in reverse load order, like shutdown.
    removed = tuple(p.name for p in reversed(old.plugins) if p.name not in after)
    settings_changed = tuple(
        f.name
        for f in fields(old.settings)
        if getattr(old.settings, f.name) != getattr(new.settings, f.name)
    )
    return ReloadPlan(
        added=tuple(added),
        removed=removed,
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        settings_changed=settings_changed,
    )
