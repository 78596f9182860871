"""Shipping a plugin's checkout to a remote host over its master connection, changes only.

Two rounds on the host, each one ``python3 -c <syncer source>`` over the master: list the
remote copy (path, mode, sha256), then, if anything differs, send a gzipped tar of exactly the
new or changed entries plus the list of paths to delete. The host needs python3 only (no
rsync): see ``aigis._remote.syncer``. The copy lives in a root-owned directory,
``/var/lib/aigis/ext/NAME`` by default; files are 0644 (0755 when executable), secrets 0400
(owned by ``secret_owner`` if given). Shipping an unchanged tree sends nothing.
"""

from __future__ import annotations

import io
import json
import logging
import re
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from aigis._remote import syncer
from aigis._remote.hosts import HostError
from aigis._remote.ssh import Master

__all__ = ["DEST_ROOT", "ShipResult", "plan", "ship"]

log = logging.getLogger(__name__)

DEST_ROOT = "/var/lib/aigis/ext"
SECRET_MODE = 0o400
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SOURCE = Path(syncer.__file__).read_text()

Manifest = dict[str, list]


@dataclass(frozen=True)
class ShipResult:
    """What one ``ship`` changed on the host."""

    host: str
    dest: str
    sent: tuple[str, ...]  # new or changed paths, in tar order
    deleted: tuple[str, ...]
    unchanged: int
    bytes_sent: int  # size of the tar sent (0 when nothing changed)


def desired(
    src: Path, secrets: Mapping[str, Path], exclude: frozenset[str] = syncer.EXCLUDE
) -> tuple[Manifest, dict[str, Path]]:
    """The remote tree we want (its manifest) and the local file behind each shipped path.

    File modes are normalised (0755 if any execute bit, else 0644); ``secrets`` maps a path in
    the plugin directory to the local file to ship there, mode 0400, over any file of the tree.
    """
    wanted = syncer.manifest(str(src), exclude)
    sources = {rel: src / rel for rel, (kind, _, _) in wanted.items() if kind == "f"}
    for entry in wanted.values():
        if entry[0] == "f":
            entry[1] = 0o755 if entry[1] & 0o111 else 0o644
    for rel, source in secrets.items():
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"secret path {rel!r} must be relative, inside the plugin")
        for parent in list(path.parents)[:-1]:
            if wanted.get(str(parent), ["d"])[0] != "d":
                raise ValueError(f"secret path {rel!r}: {parent} is not a directory")
            wanted[str(parent)] = ["d", 0, ""]
        wanted[str(path)] = ["f", SECRET_MODE, syncer.sha256(str(source))]
        sources[str(path)] = Path(source)
    return wanted, sources


def plan(wanted: Manifest, remote: Manifest) -> tuple[list[str], list[str]]:
    """(paths to send, paths to delete): an entry is sent when it is new or differs in kind,
    mode or content; a remote path absent from ``wanted`` is deleted (pure)."""
    send = sorted(rel for rel, entry in wanted.items() if remote.get(rel) != entry)
    delete = sorted(rel for rel in remote if rel not in wanted)
    return send, delete


def _tar(
    send: list[str], delete: list[str], wanted: Manifest, sources: Mapping[str, Path],
    secrets: Mapping[str, Path], secret_owner: str | None,
) -> bytes:  # fmt: skip
    control = {
        "delete": delete,
        "modes": {rel: wanted[rel][1] for rel in send if wanted[rel][0] == "f"},
        "secrets": sorted(str(PurePosixPath(r)) for r in secrets),
        "secret_owner": secret_owner,
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        data = json.dumps(control).encode()
        info = tarfile.TarInfo(syncer.CONTROL)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for rel in send:  # sorted: a directory comes before what it holds
            kind, _, digest = wanted[rel]
            info = tarfile.TarInfo(rel)
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, digest
                tar.addfile(info)
            else:
                source = sources[rel]
                info.size, info.mode = source.stat().st_size, wanted[rel][1]
                with open(source, "rb") as f:
                    tar.addfile(info, f)
    return buffer.getvalue()


def _remote_python(master: Master, command: str, dest: str, data: bytes | None) -> bytes:
    result = master.run([master.spec.python, "-c", _SOURCE, command, dest], input=data)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        kind = "no-python" if result.returncode == 127 else "failed"
        raise HostError(master.spec.name, kind, f"shipping to {dest} failed: {lines[-1]}")
    return result.stdout


def ship(
    master: Master,
    name: str,
    src: Path,
    *,
    secrets: Mapping[str, Path] | None = None,
    secret_owner: str | None = None,
    dest_root: str = DEST_ROOT,
) -> ShipResult:
    """Make ``dest_root/name`` on the host equal to ``src`` (plus secrets); idempotent."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"not a plugin name: {name!r}")
    if not stat.S_ISDIR(src.stat().st_mode):
        raise ValueError(f"{src} is not a directory")
    secrets = dict(secrets or {})
    dest = f"{dest_root.rstrip('/')}/{name}"
    wanted, sources = desired(src, secrets)
    remote = json.loads(_remote_python(master, "manifest", dest, None))
    send, delete = plan(wanted, remote)
    unchanged = len(wanted) - len(send)
    if not send and not delete:
        log.info("shipped: %s to host %s unchanged (%d entries)", name, master.spec.name,
                 unchanged)  # fmt: skip
        return ShipResult(master.spec.name, dest, (), (), unchanged, 0)
    data = _tar(send, delete, wanted, sources, secrets, secret_owner)
    _remote_python(master, "apply", dest, data)
    log.info("shipped: %s to host %s:%s (%d sent, %d deleted, %d unchanged, %d bytes)", name,
             master.spec.name, dest, len(send), len(delete), unchanged, len(data))  # fmt: skip
    return ShipResult(master.spec.name, dest, tuple(send), tuple(delete), unchanged, len(data))
