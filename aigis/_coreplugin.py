"""Importing a plugin's ``AIGIS/AIGIS.core`` and reading its SKILLS and cleanup."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import shutil
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aigis._errors import SkillError


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
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if filename and str(Path(filename).resolve()).startswith(prefix):
            del sys.modules[name]


def import_core(plugin: str, path: Path, entrypoint: Path) -> CoreModule:
    """Import ``path`` (AIGIS.core) as a unique module with ``entrypoint`` on sys.path."""
    entry = str(entrypoint)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    name = module_name(plugin)
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a plugin's fault, never AIGIS's: report it
        sys.modules.pop(name, None)
        message = str(exc).strip() or "(no message)"
        raise SkillError(
            plugin,
            f"AIGIS.core failed to import: {type(exc).__name__}: "
            f"{message} (at {_where(exc, path)})",
        ) from exc
    skills = getattr(module, "SKILLS", None)
    if skills is None:
        sys.modules.pop(name, None)
        raise SkillError(plugin, f"AIGIS.core must define SKILLS, a list of dotted names ({path})")
    if isinstance(skills, (str, bytes, dict)) or not isinstance(skills, Iterable):
        sys.modules.pop(name, None)
        raise SkillError(
            plugin, f"SKILLS must be a list of names, got {type(skills).__name__} ({path})"
        )
    cleanup = getattr(module, "cleanup", None)
    if cleanup is not None and not callable(cleanup):
        sys.modules.pop(name, None)
        raise SkillError(
            plugin, f"cleanup must be a function, got {type(cleanup).__name__} ({path})"
        )
    try:
        names = tuple(skills)  # a computed SKILLS may be any iterable, even a failing one
    except Exception as exc:
        sys.modules.pop(name, None)
        raise SkillError(
            plugin, f"SKILLS could not be read: {type(exc).__name__}: {exc} ({path})"
        ) from None
    return CoreModule(module=module, skills=names, cleanup=cleanup, origin=str(path))
