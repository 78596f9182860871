"""Plugin sources (SPEC §2): copy a local directory or clone/update a git repository.

Git work lives in ``aigis._git`` and is imported on the first git source: pygit2 (libgit2 and
its TLS libraries) costs about 20 MiB of the core's memory, which a core with only local
sources never needs.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

from aigis._errors import SourceError
from aigis._quote import escape
from aigis._settings import LOCAL_COPY_MAX_BYTES, LOCAL_COPY_MAX_FILES

log = logging.getLogger(__name__)  # also aigis._git's: one logger for plugin sources


@dataclass(frozen=True)
class Fetched:
    """Where a plugin's files are now and whether this fetch changed them."""

    kind: str  # "local" or "git"
    path: Path  # the plugin directory, <state>/ext/<name>
    commit: str | None  # HEAD commit hex for git, None for local
    updated: bool  # True when this call created or changed the directory


def stored_credentials(url: str, lines: list[str]) -> tuple[str, str] | None:
    """(user, password) for ``url`` from git-credential-store lines (``https://USER:TOKEN@HOST``,
    optionally with a port and a path prefix): the longest matching path wins. Pure."""
    try:
        target = urlsplit(url)
        target_port = target.port
    except ValueError:
        return None
    best: tuple[int, str, str] | None = None
    for line in lines:
        try:
            entry = urlsplit(line.strip())
            entry_port = entry.port
        except ValueError:
            continue
        if entry.scheme != target.scheme or entry.password is None:
            continue
        if (entry.hostname, entry_port) != (target.hostname, target_port):
            continue
        prefix = entry.path.rstrip("/")
        if prefix and not (target.path == prefix or target.path.startswith(prefix + "/")):
            continue
        if best is None or len(prefix) > best[0]:
            best = (len(prefix), unquote(entry.username or ""), unquote(entry.password))
    return (best[1], best[2]) if best else None


def is_local_source(source: str, base_dir: Path) -> bool:
    """Tell whether source is an existing local path (relative paths resolve against base_dir)."""
    return "://" not in source and _local_path(source, base_dir).exists()


def fetch(name: str, source: str, dest: Path, *, ref: str | None = None, base_dir: Path) -> Fetched:
    """Bring plugin `name` from `source` into `dest`: copy once, or clone then fast-forward."""
    if is_local_source(source, base_dir):
        if ref is not None:
            log.warning('ignored: plugin "%s": ref "%s" applies to git sources only', name, ref)
        return _copy(name, _local_path(source, base_dir), dest)
    git = _git_module(name)
    if os.path.lexists(dest):
        return git.update(name, source, dest, ref)
    return git.clone(name, source, dest, ref)


def _git_module(name: str) -> ModuleType:
    """``aigis._git``, imported now; a SourceError naming plugin ``name`` when pygit2 is missing."""
    try:
        from aigis import _git
    except ImportError as exc:
        raise SourceError(
            name,
            f"git sources need pygit2, which cannot be imported ({exc}); install it "
            "(Debian: python3-pygit2) or use a local source",
        ) from exc
    return _git


def local_path(source: str, base_dir: Path) -> Path:
    """The directory a local ``source`` names (relative paths resolve against base_dir)."""
    return _local_path(source, base_dir)


def copy_local(src: Path, dest: Path) -> None:
    """Copy the local source ``src`` to ``dest`` (absent) with the bounds of a plugin copy;
    SourceError-free: OSError, or ValueError saying what was refused."""
    try:
        _LocalCopy(src).copy(dest)
    except _Refused as exc:
        raise ValueError(str(exc)) from None


def _local_path(source: str, base_dir: Path) -> Path:
    """Return source as an absolute path; an absolute source ignores base_dir."""
    return (base_dir / Path(source).expanduser()).absolute()


def _copy(name: str, src: Path, dest: Path) -> Fetched:
    """Copy a local plugin to dest unless dest exists (there is no safe way to merge trees)."""
    if os.path.lexists(dest):
        log.warning(
            'not updated: plugin "%s": %s already exists; delete it to re-copy from %s',
            name,
            dest,
            src,
        )
        return Fetched("local", dest, None, False)
    if not src.is_dir():
        raise SourceError(name, f"local source {src} is not a directory")
    try:
        with staging(dest) as tmp:
            _LocalCopy(src).copy(tmp)
    except (OSError, _Refused) as exc:
        raise SourceError(name, escape(f"copy of {src} failed: {exc}")) from None
    log.info('copied: plugin "%s" from %s', name, src)
    return Fetched("local", dest, None, True)


class _Refused(Exception):
    """The local source holds something AIGIS will not copy; the message says what."""


_SPECIAL = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


class _LocalCopy:
    """Copies a local source, following links inside it (SPEC §2: links are followed).

    Bounded: a link may not lead outside the source, a directory may not contain itself (a
    loop), only regular files and directories are copied (a device or FIFO would be read
    forever), and the total size and number of entries are capped.
    """

    def __init__(self, src: Path) -> None:
        self.src = src
        self.top = os.path.realpath(src)
        self.bytes_left = LOCAL_COPY_MAX_BYTES
        self.entries_left = LOCAL_COPY_MAX_FILES

    def copy(self, dest: Path) -> None:
        """Copy the source to ``dest`` (which must not exist)."""
        top = os.stat(self.top)
        self._directory(self.top, str(self.src), str(dest), {(top.st_dev, top.st_ino): self.src})

    def _count(self, size: int) -> None:
        self.entries_left -= 1
        self.bytes_left -= size
        if self.entries_left < 0:
            raise _Refused(
                f"more than {LOCAL_COPY_MAX_FILES} files and directories, the limit for a "
                "local source (LOCAL_COPY_MAX_FILES)"
            )
        if self.bytes_left < 0:
            raise self._too_big()

    @staticmethod
    def _too_big() -> _Refused:
        return _Refused(
            f"larger than {LOCAL_COPY_MAX_BYTES} bytes, the limit for a local source "
            "(LOCAL_COPY_MAX_BYTES)"
        )

    def _directory(self, real: str, shown: str, dest: str, ancestors: dict) -> None:
        os.mkdir(dest)
        with os.scandir(real) as scan:
            names = sorted(entry.name for entry in scan)
        for name in names:
            path, where, target = (
                os.path.join(real, name),
                os.path.join(shown, name),
                os.path.join(dest, name),
            )
            if os.path.islink(path):
                path = os.path.realpath(path)
                if path != self.top and not path.startswith(self.top.rstrip("/") + "/"):
                    raise _Refused(f"{where} leads to {path}, outside the source")
            info = os.stat(path)  # FileNotFoundError for a dangling link
            kind = stat.S_IFMT(info.st_mode)
            if kind == stat.S_IFDIR:
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    raise _Refused(
                        f"{where} is a directory loop (it leads back to {ancestors[key]})"
                    )
                self._count(0)
                self._directory(path, where, target, {**ancestors, key: where})
            elif kind == stat.S_IFREG:
                self._count(info.st_size)
                self._file(path, where, target)
            else:
                raise _Refused(
                    f"{where} is {_SPECIAL.get(kind, 'not a regular file')}; "
                    "only files and directories are copied"
                )
        shutil.copystat(real, dest)

    def _file(self, path: str, shown: str, dest: str) -> None:
        # O_NONBLOCK: should a FIFO replace the file since the stat, open must not wait for it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as source:
            if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                raise _Refused(f"{shown} changed while it was copied")
            with open(dest, "wb") as out:
                # A file growing while it is copied still counts against the cap.
                budget = self.bytes_left + os.fstat(source.fileno()).st_size
                while chunk := source.read(min(1 << 20, budget + 1)):
                    budget -= len(chunk)
                    if budget < 0:
                        raise self._too_big()
                    out.write(chunk)
        shutil.copystat(path, dest)


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """Yield a fresh path beside dest, renamed to dest on success and removed on any failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The yielded path sits inside a private holder so that copytree/clone create it with the
    # usual umask permissions (mkdtemp's 0700 would otherwise become the plugin directory's mode).
    holder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield holder / dest.name
        # A rename on one filesystem is atomic: dest is either absent or a complete plugin.
        os.rename(holder / dest.name, dest)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
