"""Per-plugin runtime files on disk: drop-ins (where they live, written atomically) and the
exit records their ``ExecStopPost=`` leaves (read with one bounded readlink)."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

from aigis._errors import PluginError
from aigis._supervise.base import ProcessSpec
from aigis._supervise.units import DROPIN_NAME, EXIT_DIR, STOPPING_DROPIN_NAME, TEMPLATE

UNIT_DIR = "run/systemd/system"  # relative to the root: runtime drop-ins vanish at reboot
EXIT_RECORD_MAX = 256  # bytes; a record is three short words


def dropin_path(root: Path, unit: str) -> Path:
    """``ROOT/run/systemd/system/UNIT.d/50-aigis.conf`` (ROOT is / except in tests)."""
    return root / UNIT_DIR / f"{unit}.d" / DROPIN_NAME


def stopping_path(root: Path) -> Path:
    """``ROOT/run/systemd/system/aigis-plugin@.service.d/90-aigis-stopping.conf``."""
    return root / UNIT_DIR / f"{TEMPLATE}.d" / STOPPING_DROPIN_NAME


def absolute_program(spec: ProcessSpec) -> ProcessSpec:
    """``spec`` with argv[0] made absolute, as systemd's ExecStart= requires."""
    return replace(spec, argv=(resolve_program(spec), *spec.argv[1:]))


def resolve_program(spec: ProcessSpec) -> str:
    """argv[0] as an absolute path: relative to cwd when it has a slash, else found on PATH."""
    program = spec.argv[0]
    if os.path.isabs(program):
        return program
    if "/" in program:
        return os.path.normpath(os.path.join(spec.cwd, program))
    search = spec.env.get("PATH") or os.environ.get("PATH") or os.defpath
    found = shutil.which(program, path=search)
    if found is None:
        raise PluginError(spec.name, f'cannot find "{program}" on PATH ({search})')
    return os.path.abspath(found)


def write_dropin(name: str, path: Path, text: str) -> None:
    """Replace the drop-in in one rename, so systemd never reads half of it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(text)
        # 0644 whatever the core's UMask=: systemd warns about world-inaccessible drop-ins (their
        # contents are readable over D-Bus anyway).
        temp.chmod(0o644)
        os.replace(temp, path)
    except OSError as exc:
        raise PluginError(name, f"cannot write {path}: {exc}") from None


def delete_dropin(path: Path) -> None:
    """Remove the drop-in, and its directory unless something else (an operator's) is in it."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def exit_dir(root: Path) -> Path:
    """``ROOT/run/aigis/exits``: one record per unit (``units.exit_record_line``)."""
    return root / EXIT_DIR.lstrip("/")


def make_exit_dir(root: Path) -> None:
    """Create the directory the units' ExecStopPost= writes into (it does not create it)."""
    path = exit_dir(root)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def read_exit(root: Path, unit: str) -> tuple[str, float] | None:
    """The record ``unit`` left (a symlink's target, bounded) and when (its mtime), or None."""
    path = exit_dir(root) / unit
    try:
        stat = os.lstat(path)
        text = os.readlink(path) if stat.st_size <= EXIT_RECORD_MAX else ""
    except OSError:  # none yet, or not a symlink
        return None
    return text, stat.st_mtime


def delete_exit(root: Path, unit: str) -> None:
    """Forget how ``unit`` last ended (the plugin is removed)."""
    with contextlib.suppress(OSError):
        (exit_dir(root) / unit).unlink()
