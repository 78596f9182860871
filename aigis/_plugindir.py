"""A plugin's directory: its own files read safely, and the one validation shared by
``aigisctl check`` and the loader.

Plugin files are plugin-controlled: AIGIS reads them only as regular files inside the plugin
directory (a link may not lead out of it), never a device or FIFO, and at most
``MAX_PLUGIN_FILE`` bytes, so a manifest linked to ``/dev/zero`` is an error, not an outage.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from aigis._errors import ManifestError
from aigis._manifest import CORE_FILE, MANIFEST, Manifest, parse_manifest, plugin_problems
from aigis._quote import escape
from aigis._settings import MAX_PLUGIN_FILE

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


class UnreadableFile(Exception):
    """A plugin file exists but may not or cannot be read; the message names it."""


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit} bytes"


def read_plugin_file(root: Path, relative: Path, limit: int = MAX_PLUGIN_FILE) -> str | None:
    """The UTF-8 text of ``root/relative``, None when it does not exist; UnreadableFile when it
    leads outside ``root``, is not a regular file, is larger than ``limit`` or is not text."""
    path = root / relative
    if not os.path.lexists(path):
        return None
    real, top = os.path.realpath(path), os.path.realpath(root)
    if not real.startswith(top.rstrip("/") + "/"):
        raise UnreadableFile(escape(f"{path}: leads to {real}, outside the plugin directory"))
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:  # a dangling link
        return None
    except OSError as exc:
        raise UnreadableFile(escape(f"{path}: cannot read: {exc.strerror}")) from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
            raise UnreadableFile(escape(f"{path}: is {kind}, not a regular file"))
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise UnreadableFile(escape(f"{path}: cannot read: {exc.strerror}")) from None
    if len(data) > limit:
        raise UnreadableFile(escape(f"{path}: larger than {_size(limit)}, the limit for this file"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(
            escape(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        ) from None


@dataclass
class PluginCheck:
    """What validating a plugin directory found: the manifest (None if unusable), error lines
    and warning lines, each naming its file."""

    manifest: Manifest | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def validate_plugin(root: Path, plugin: str, table: str, files: Path | None = None) -> PluginCheck:
    """Validate ``plugin``'s directory ``root`` (listed under ``[table]``): manifest, HOST,
    ENTRYPOINT, AIGIS.core presence and syntax. Runs nothing. The manifest and AIGIS.core are
    read from ``files`` (the core's snapshot of the source) when given; ``{root}`` is ``root``,
    and messages name the files under ``root``, where the operator finds the same text."""
    files = root if files is None else files
    origin = root / MANIFEST
    try:
        text = read_plugin_file(files, MANIFEST)
    except UnreadableFile as exc:
        return PluginCheck(None, [str(exc)])
    if text is None:
        return PluginCheck(
            None, [f"{origin}: manifest not found (every plugin needs AIGIS/AIGIS.config)"]
        )
    try:
        manifest = parse_manifest(text, str(origin), root, plugin)
    except ManifestError as exc:
        return PluginCheck(None, exc.problems)
    core_file = root / CORE_FILE
    try:
        core_text, core_problem = read_plugin_file(files, CORE_FILE), None
    except UnreadableFile as exc:
        core_text, core_problem = None, str(exc)
    errors, warnings = plugin_problems(
        manifest,
        table,
        str(origin),
        entrypoint_is_dir=manifest.entrypoint.is_dir(),
        core_file=str(core_file),
        core_text=core_text,
        core_problem=core_problem,
    )
    return PluginCheck(manifest, errors, warnings)
