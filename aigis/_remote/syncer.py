"""The receiving end of shipping: lists a tree and applies a tar of changes to it.

Self-contained (standard library only, Python 3.11): ``aigis._remote.ship`` sends this file's
source to the remote host as ``python3 -c SOURCE manifest|apply DEST`` over the master
connection, so the host needs nothing but python3. Locally, ship imports it to list the source
tree the same way, so both sides agree on what "unchanged" means.

A manifest maps each relative path to ``[kind, mode, digest]``: ``f`` (file, permission bits,
sha256 of the content), ``l`` (symlink, 0, its target) or ``d`` (directory, 0, "").
``apply`` reads a tar from stdin whose first member ``.aigis-ship.json`` lists the paths to
delete and the mode of each file; every file is written to a temporary name and renamed over
the old one, and no path ever goes through a symlink or leaves DEST.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import sys
import tarfile
from typing import IO

CONTROL = ".aigis-ship.json"
EXCLUDE = frozenset({".git", "__pycache__"})


def manifest(root: str, exclude: frozenset[str] = EXCLUDE) -> dict[str, list]:
    """``{relative path: [kind, mode, digest]}`` of everything under ``root`` ({} if absent)."""
    found: dict[str, list] = {}
    if not os.path.isdir(root):
        return found
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in exclude)
        rel_top = os.path.relpath(top, root)
        for name in dirs + sorted(f for f in files if f not in exclude):
            path = os.path.join(top, name)
            rel = os.path.normpath(os.path.join(rel_top, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ["l", 0, os.readlink(path)]
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ["d", 0, ""]
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ["f", stat.S_IMODE(st.st_mode), sha256(path)]
    return found


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(root: str, rel: str, create: bool = True) -> str:
    """``root/rel``, refusing absolute paths and ``..``; parents that are not real directories
    (a symlinked parent could point anywhere) are replaced by directories (``create``) or
    make the path count as absent (returned as "")."""
    parts = rel.split("/")
    if rel.startswith("/") or not rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"refusing path {rel!r}")
    path = root
    for part in parts[:-1]:
        path = os.path.join(path, part)
        st = os.lstat(path) if os.path.lexists(path) else None
        if not create and (st is None or not stat.S_ISDIR(st.st_mode)):
            return ""
        if st is None:
            os.mkdir(path, 0o755)
        elif not stat.S_ISDIR(st.st_mode):
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISREG(st.st_mode):
                raise ValueError(f"refusing path {rel!r}: {part} is not a directory")
            os.unlink(path)  # replaced by a directory in the new tree
            os.mkdir(path, 0o755)
    return os.path.join(path, parts[-1])


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The content of a regular file member (ValueError for anything else)."""
    content = tar.extractfile(member)
    if content is None:
        raise ValueError(f"{member.name}: not a regular file")
    return content


def _remove(path: str) -> None:
    if not path:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for top, dirs, files in os.walk(path, topdown=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                os.unlink(os.path.join(top, name))
            for name in dirs:
                if not os.path.islink(os.path.join(top, name)):
                    os.rmdir(os.path.join(top, name))
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply(root: str, stream) -> dict[str, int]:
    """Apply the tar on ``stream`` to ``root`` (created 0755 if missing); counts of changes."""
    os.makedirs(root, mode=0o755, exist_ok=True)
    os.chmod(root, 0o755)
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        first = tar.next()
        if first is None or first.name != CONTROL:
            raise ValueError(f"the first member must be {CONTROL}")
        control = json.loads(_member(tar, first).read())
        for rel in sorted(control["delete"], key=lambda r: -r.count("/")):
            _remove(_inside(root, rel, create=False))
        owner = None
        if control.get("secret_owner"):
            entry = pwd.getpwnam(control["secret_owner"])
            owner = (entry.pw_uid, entry.pw_gid)
        written = 0
        while (member := tar.next()) is not None:  # (iterating would restart at the control)
            path = _inside(root, member.name)
            if member.isdir():
                if not os.path.isdir(path) or os.path.islink(path):
                    _remove(path)
                    os.mkdir(path, 0o755)
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                _remove(path)  # a directory replaced by a file or a link
            temp = os.path.join(os.path.dirname(path), f".aigis-ship.{os.getpid()}.tmp")
            if os.path.lexists(temp):
                os.unlink(temp)
            if member.issym():
                os.symlink(member.linkname, temp)
            elif member.isfile():
                mode = control["modes"][member.name]
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(_member(tar, member), out)
                    if owner is not None and member.name in control["secrets"]:
                        os.fchown(out.fileno(), owner[0], owner[1])
                    os.fchmod(out.fileno(), mode)
            else:
                raise ValueError(f"refusing member {member.name!r}: not a file, dir or link")
            os.replace(temp, path)
            written += 1
    return {"written": written, "deleted": len(control["delete"])}


def main(argv: list[str]) -> int:
    command, root = argv[1], argv[2]
    if command == "manifest":
        json.dump(manifest(root), sys.stdout)
    elif command == "apply":
        json.dump(apply(root, sys.stdin.buffer), sys.stdout)
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
