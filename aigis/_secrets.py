"""Copying a plugin's secrets from ``<secrets>/<name>/`` into its directory (mode 0600)."""

from __future__ import annotations

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
    """Copy every secret or none; return how many were copied."""
    pairs = plan_secrets(plugin, secrets, secrets_dir, root)
    for source, target in pairs:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            data = source.read_bytes()
            # Created 0600 from the start: the secret is never readable by others, even briefly.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode otherwise
                out.write(data)
        except OSError as exc:
            raise SecretsError(
                plugin, f"cannot copy secret {source} to {target}: {exc.strerror or exc}"
            ) from None
    return len(pairs)
