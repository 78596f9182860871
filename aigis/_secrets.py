"""Copying a plugin's secrets from ``<secrets>/<name>/`` into its directory (mode 0400)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from aigis._errors import SecretsError


def plan_secrets(
    plugin: str, secrets: dict[str, str], secrets_dir: Path, root: Path
) -> list[tuple[Path, Path]]:
    """(source, destination file) pairs; raise listing every missing or misplaced secret."""
    source_dir = secrets_dir / plugin
    missing, outside, escaping, unreadable, pairs = [], [], [], [], []
    real_root = root.resolve()
    real_source_dir = source_dir.resolve()
    for name, dest in secrets.items():
        source = source_dir / name
        if real_source_dir not in source.resolve().parents:
            escaping.append(name)
            continue
        try:
            is_file = source.is_file()
        except PermissionError:
            unreadable.append(str(source))
            continue
        if not is_file:
            missing.append(str(source))
            continue
        target = Path(dest)
        if not target.is_absolute():
            target = root / target
        if dest.endswith("/") or target.is_dir():
            target = target / Path(name).name
        resolved = target.resolve()
        if resolved != real_root and real_root not in resolved.parents:
            outside.append(f"{name} -> {dest}")
            continue
        pairs.append((source, target))
    problems = []
    if missing:
        problems.append("missing secrets: " + ", ".join(missing))
    if outside:
        problems.append(
            f"secret destinations outside the plugin directory {root}: " + ", ".join(outside)
        )
    if unreadable:
        problems.append("secrets not readable (permission denied): " + ", ".join(unreadable))
    if escaping:
        problems.append(f"secret names must be files inside {source_dir}: " + ", ".join(escaping))
    if problems:
        raise SecretsError(plugin, "; ".join(problems))
    return pairs


def copy_secrets(plugin: str, secrets: dict[str, str], secrets_dir: Path, root: Path) -> int:
    """Copy every secret or none; return how many were copied.

    The plugin may own (and have changed) its directory, so each destination is reached by
    file descriptor from ``root`` without following any symlink, and written to a new file
    renamed over the old one: a planted symlink is replaced, never written through."""
    pairs = plan_secrets(plugin, secrets, secrets_dir, root)
    for source, target in pairs:
        try:
            data = source.read_bytes()
            _write_private(root, Path(os.path.relpath(target, root)), data)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SecretsError(
                plugin, f"cannot copy secret {source} to {target}: {reason}"
            ) from None
    return len(pairs)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_private(root: Path, relative: Path, data: bytes) -> None:
    """Write ``root/relative`` (mode 0400: read-only, for its owner alone; the plugin's account
    once its directory is handed over) creating directories, never following symlinks."""
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"{relative} is not a path inside {root}")
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in relative.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            parent, fd = fd, os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(parent)
        name = relative.parts[-1]
        temp = f".{name}.{os.getpid()}.tmp"
        # Created 0400 from the start: the secret is never readable by others, even briefly.
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as stream:
                stream.write(data)
            os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=fd)
            raise
    finally:
        os.close(fd)
