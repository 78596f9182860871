"""The core's own copy of each plugin's source: what the core reads, imports or runs as root
(the manifest, AIGIS.core and the modules it imports, the requirements file and command) comes
from here, never from the plugin's checkout, which the plugin's own account may rewrite.

Taken when the source is fetched, from the operator's source of truth: the fetched commit in
the checkout's ``.git`` (kept root's when the checkout is handed over), or a local source's
directory (a fresh copy, before any plugin process ran). Kept under ``<state>/snapshots``,
mode 0700: neither plugins nor other local users read it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aigis._errors import SourceError
from aigis._log import about
from aigis._paths import make_dir
from aigis._quote import escape
from aigis._redact import redact
from aigis._settings import LOCAL_COPY_MAX_BYTES, LOCAL_COPY_MAX_FILES
from aigis._sources import Fetched, copy_local, local_path

if TYPE_CHECKING:
    import pygit2  # imported when a git snapshot is taken: it costs the core ~20 MiB

log = logging.getLogger(__name__)

SNAPSHOT_MODE = 0o700
# git's file modes (tree entries), stable across libgit2 versions
_TREE, _BLOB, _EXECUTABLE, _LINK = 0o040000, 0o100644, 0o100755, 0o120000


def take_snapshot(
    name: str, fetched: Fetched, source: str, base_dir: Path, snapshots: Path
) -> Path:
    """The snapshot of plugin ``name`` (``snapshots/name``), refreshed when ``fetched`` brought
    a new commit (git) or a fresh copy (local); SourceError when there is none to take."""
    dest = snapshots / name
    make_dir(snapshots, SNAPSHOT_MODE)
    if fetched.kind == "git":
        marker = snapshots / f"{name}.commit"
        if fetched.commit is None:
            if dest.is_dir():
                log.warning(
                    'kept: plugin "%s": the snapshot of its last commit (%s has none)',
                    name,
                    fetched.path,
                    **about(name),
                )
                return dest
            raise SourceError(
                name,
                f"{fetched.path} holds no commit to take the core's copy from; delete it to "
                f"clone {redact(source)} again",
            )
        if dest.is_dir() and _read(marker) == fetched.commit:
            return dest
        commit = fetched.commit
        _replace(name, dest, lambda tmp: from_git(fetched.path, commit, tmp))
        marker.write_text(commit + "\n")
        log.info('snapshot: plugin "%s": taken from commit %s', name, commit[:12], **about(name))
        return dest
    if not fetched.updated and dest.is_dir():
        return dest
    # A fresh copy is the operator's source as it was a moment ago, before any plugin process
    # ran; an older checkout (copied by a release without snapshots) is not trusted.
    origin = fetched.path if fetched.updated else local_path(source, base_dir)
    _replace(name, dest, lambda tmp: copy_local(origin, tmp))
    log.info('snapshot: plugin "%s": taken from %s', name, origin, **about(name))
    return dest


def in_snapshot(path: Path, root: Path, snapshot: Path) -> Path:
    """``path`` (a manifest path under the checkout ``root``) inside ``snapshot``; a path
    outside the checkout is not the plugin's to write and stays as it is. Pure."""
    if path == root:
        return snapshot
    if path.is_relative_to(root):
        return snapshot / path.relative_to(root)
    return path


def _read(marker: Path) -> str | None:
    try:
        return marker.read_text().strip()
    except OSError:
        return None


def _replace(name: str, dest: Path, build: Callable[[Path], None]) -> None:
    """Build a new snapshot beside ``dest`` and put it in its place; the old one goes."""
    holder = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dest.parent))
    try:
        try:
            build(holder / "new")
        except (OSError, ValueError, KeyError) as exc:  # from_git turns GitError into ValueError
            raise SourceError(name, escape(f"cannot take the core's copy: {exc}")) from None
        os.chmod(holder / "new", SNAPSHOT_MODE)
        if os.path.lexists(dest):
            os.rename(dest, holder / "old")
        os.rename(holder / "new", dest)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def from_git(checkout: Path, commit: str, dest: Path) -> None:
    """Write the tree of ``commit`` from ``checkout``'s object database (not its working
    files) to ``dest``; links are kept only when they stay inside the tree."""
    import pygit2

    try:
        repo = pygit2.Repository(str(checkout / ".git"))
    except pygit2.GitError as exc:
        raise ValueError(str(exc)) from None
    try:
        tree = repo.revparse_single(commit).peel(pygit2.Commit).tree
        budget = [LOCAL_COPY_MAX_FILES, LOCAL_COPY_MAX_BYTES]
        _write_tree(repo, tree, dest, Path(), budget)
    except pygit2.GitError as exc:
        raise ValueError(str(exc)) from None
    finally:
        repo.free()
    _links_stay_inside(dest)


def _links_stay_inside(dest: Path) -> None:
    """ValueError naming a link of ``dest`` that, followed with the links it passes through
    (``b -> .`` makes ``b/b/../..`` climb out), leads outside ``dest``."""
    top = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(dest):  # links to directories are not entered
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            real = os.path.realpath(path)
            if real != top and not real.startswith(top + os.sep):
                shown = os.path.relpath(path, dest)
                raise ValueError(f"{shown} leads to {real}, outside the repository")


def _write_tree(
    repo: pygit2.Repository, tree: pygit2.Tree, dest: Path, shown: Path, budget: list[int]
) -> None:
    os.mkdir(dest, 0o755)
    for entry in tree:
        name = entry.name
        if name in ("", ".", "..", ".git") or "/" in name or "\0" in name:
            raise ValueError(f"{shown / name}: not a file name AIGIS writes")
        target, where = dest / name, shown / name
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"more than {LOCAL_COPY_MAX_FILES} files (LOCAL_COPY_MAX_FILES)")
        mode = entry.filemode
        if mode == _TREE:
            _write_tree(repo, repo[entry.id], target, where, budget)
            continue
        if mode not in (_BLOB, _EXECUTABLE, _LINK):
            continue  # a submodule: not part of this repository's files
        data = repo[entry.id].data
        budget[1] -= len(data)
        if budget[1] < 0:
            raise ValueError(f"larger than {LOCAL_COPY_MAX_BYTES} bytes (LOCAL_COPY_MAX_BYTES)")
        if mode == _LINK:
            link = os.fsdecode(data)
            resolved = os.path.normpath(os.path.join(str(shown), link))
            if os.path.isabs(link) or resolved == ".." or resolved.startswith("../"):
                raise ValueError(f"{where} leads to {link}, outside the repository")
            os.symlink(link, target)
            continue
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(target, 0o755 if mode == _EXECUTABLE else 0o644)
