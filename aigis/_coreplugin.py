"""Importing a plugin's ``AIGIS/AIGIS.core`` and reading its SKILLS and cleanup."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import shutil
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aigis._errors import SkillError
from aigis._plugindir import UnreadableFile, read_plugin_file

log = logging.getLogger(__name__)


@dataclass
class CoreModule:
    """An imported AIGIS.core: the module, its SKILLS names and its cleanup (if any)."""

    module: types.ModuleType
    skills: tuple[object, ...]
    cleanup: Callable[[], object] | None
    origin: str


def module_name(plugin: str) -> str:
    """A unique, importable module name for ``plugin``'s AIGIS.core."""
    return "aigis_core_" + re.sub(r"[^A-Za-z0-9_]", "_", plugin)


def _where(exc: BaseException, path: Path) -> str:
    """``file:line`` of the innermost frame, to point at the culprit without a traceback."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    frame = frames[-1] if frames else None
    return f"{frame.filename}:{frame.lineno}" if frame else str(path)


def forget_modules_under(root: Path) -> None:
    """Drop cached modules and bytecode of files under ``root``, so a reload re-imports them.

    Bytecode goes too: copied sources keep their mtime, so an edit of the same size within the
    same second would otherwise be served from a stale ``.pyc``.
    """
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    prefix = str(root.resolve()) + "/"
    for plugin, entry in list(_ENTRYPOINTS.items()):
        if (entry + "/").startswith(prefix):
            del _ENTRYPOINTS[plugin]
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if filename and str(Path(filename).resolve()).startswith(prefix):
            del sys.modules[name]


class _TextLoader(importlib.abc.Loader):
    """Executes source text already read (bounded) from ``path``; serves it to tracebacks."""

    def __init__(self, text: str, path: Path) -> None:
        self.text, self.path = text, path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        exec(compile(self.text, str(self.path), "exec", dont_inherit=True), vars(module))

    def get_source(self, fullname: str) -> str:
        return self.text


# Core plugins share one interpreter and one sys.modules: ``import helper`` in two plugins
# names one module. Each imported plugin's ENTRYPOINT is remembered so that a plugin whose
# top-level module is already imported from another plugin fails, naming both.
_ENTRYPOINTS: dict[str, str] = {}  # plugin -> real path of its ENTRYPOINT


def _top_level_modules(entrypoint: Path) -> dict[str, Path]:
    """Top-level module and package names importable from ``entrypoint`` -> their path."""
    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)
    found: dict[str, Path] = {}
    try:
        entries = list(os.scandir(entrypoint))
    except OSError:
        return found
    for entry in entries:
        if entry.is_dir():
            stem: str | None = entry.name
        else:
            suffix = next((x for x in suffixes if entry.name.endswith(x)), None)
            stem = entry.name[: -len(suffix)] if suffix else None
        if stem and stem.isidentifier():
            found.setdefault(stem, Path(entry.path))
    return found


def _location(module: types.ModuleType) -> str | None:
    """Real path of the file (or first directory, for a namespace package) behind a module."""
    filename = getattr(module, "__file__", None)
    if not filename:
        path = getattr(module, "__path__", None)
        filename = next(iter(path), None) if path is not None else None
    return os.path.realpath(filename) if isinstance(filename, str) else None


def _owner(location: str, other_than: str) -> str | None:
    """The plugin (other than ``other_than``) whose ENTRYPOINT holds ``location``."""
    for plugin, entry in _ENTRYPOINTS.items():
        if plugin != other_than and location.startswith(entry.rstrip("/") + "/"):
            return plugin
    return None


def _shared_module(plugin: str, entrypoint: Path) -> str | None:
    """Why ``plugin`` cannot be imported beside the others, or None."""
    for name, own in sorted(_top_level_modules(entrypoint).items()):
        module = sys.modules.get(name)
        location = _location(module) if module is not None else None
        other = _owner(location, plugin) if location else None
        if other is not None:
            return (
                f'module "{name}" is already imported from plugin "{other}" ({location}) and '
                f'plugin "{plugin}" ships its own ({own}); core plugins share one interpreter, '
                "so top-level module names must differ: rename one of them"
            )
    return None


def _forget_entrypoint(plugin: str, entrypoint: str, core_module: str, before: set[str]) -> None:
    """Drop the AIGIS.core module and the modules its failed import left behind (only those
    new since ``before`` and from ``entrypoint``: an ENTRYPOINT may be a shared directory)."""
    sys.modules.pop(core_module, None)
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        location = _location(module) if module is not None else None
        if location and location.startswith(entrypoint.rstrip("/") + "/"):
            del sys.modules[name]
    _ENTRYPOINTS.pop(plugin, None)


def import_core(plugin: str, path: Path, entrypoint: Path, shown: Path | None = None) -> CoreModule:
    """Import ``path`` (AIGIS.core) as a unique module with ``entrypoint`` on sys.path;
    messages and tracebacks name it ``shown`` (the same file in the plugin's checkout)."""
    try:
        text = read_plugin_file(path.parents[1], path.relative_to(path.parents[1]))
    except UnreadableFile as exc:
        raise SkillError(plugin, str(exc)) from None
    if text is None:
        raise SkillError(plugin, f"{path}: not found")
    path = path if shown is None else shown
    problem = _shared_module(plugin, entrypoint)
    if problem is not None:
        raise SkillError(plugin, problem)
    entry = str(entrypoint)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    real_entry = os.path.realpath(entry)
    _ENTRYPOINTS[plugin] = real_entry
    name = module_name(plugin)
    spec = importlib.util.spec_from_file_location(name, path, loader=_TextLoader(text, path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a plugin's fault, never AIGIS's: report it
        _forget_entrypoint(plugin, real_entry, name, before)
        message = str(exc).strip() or "(no message)"
        raise SkillError(
            plugin,
            f"AIGIS.core failed to import: {type(exc).__name__}: "
            f"{message} (at {_where(exc, path)})",
        ) from exc
    skills = getattr(module, "SKILLS", None)
    if skills is None:
        _forget_entrypoint(plugin, real_entry, name, before)
        raise SkillError(plugin, f"AIGIS.core must define SKILLS, a list of dotted names ({path})")
    if isinstance(skills, (str, bytes, dict)) or not isinstance(skills, Iterable):
        _forget_entrypoint(plugin, real_entry, name, before)
        raise SkillError(
            plugin, f"SKILLS must be a list of names, got {type(skills).__name__} ({path})"
        )
    cleanup = getattr(module, "cleanup", None)
    if cleanup is not None and not callable(cleanup):
        _forget_entrypoint(plugin, real_entry, name, before)
        raise SkillError(
            plugin, f"cleanup must be a function, got {type(cleanup).__name__} ({path})"
        )
    try:
        names = tuple(skills)  # a computed SKILLS may be any iterable, even a failing one
    except Exception as exc:
        _forget_entrypoint(plugin, real_entry, name, before)
        raise SkillError(
            plugin, f"SKILLS could not be read: {type(exc).__name__}: {exc} ({path})"
        ) from None
    _warn_shadowed(plugin, real_entry, set(sys.modules) - before)
    return CoreModule(module=module, skills=names, cleanup=cleanup, origin=str(path))


def _warn_shadowed(plugin: str, entrypoint: str, imported: set[str]) -> None:
    """Warn when ``plugin`` just imported a top-level module that an earlier plugin also
    ships: should that plugin import it later (inside a function), it would get this one."""
    mine = set()
    for name in imported:
        module = sys.modules.get(name) if "." not in name else None
        location = _location(module) if module is not None else None
        if location and location.startswith(entrypoint.rstrip("/") + "/"):
            mine.add(name)
    for other, entry in list(_ENTRYPOINTS.items()):
        if other == plugin or not mine:
            continue
        for name in sorted(mine & set(_top_level_modules(Path(entry)))):
            log.warning(
                'shadowed: module "%s" of plugin "%s" is now plugin "%s"\'s: core plugins share '
                'one interpreter, and an import of it by plugin "%s" gets this one',
                name,
                other,
                plugin,
                other,
            )
