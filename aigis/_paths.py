"""Directories the core creates, with their mode set explicitly (never left to the umask):
0750, so only root and the core's group (aigis) may list or read what is inside."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o750


def make_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create ``path`` and any missing parents with ``mode`` exactly; existing ones are left as
    they are (an operator's or a package's choice)."""
    path = Path(path)
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            continue  # created meanwhile by someone else: theirs to set
        os.chmod(directory, mode)  # mkdir's mode is filtered by the umask
    return path
