"""A plugin's own account and what it may touch: the account created with systemd-sysusers, its
checkout handed over, and connecting to the core's socket granted to its uid alone (an ACL).

Runs as root in the core, on directories the plugin can write: every walk is by file descriptor
and never follows a symlink the plugin may have planted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
import struct
import subprocess
from pathlib import Path

from aigis._errors import PluginError
from aigis._log import about
from aigis._supervise.base import ProcessSpec
from aigis._supervise.units import plugin_user, quote

log = logging.getLogger(__name__)

SYSUSERS_DIR = "run/sysusers.d"  # relative to the root, like the drop-ins: rewritten every start
#: Kept root's inside a plugin's directory: the manifest and AIGIS.core (which the core reads and
#: imports) and git's metadata (which the core updates). The directory itself is root's, sticky and
#: group-writable, so the plugin can neither change these nor rename them away.
KEEP_ROOTS = ("AIGIS", ".git")
OWN_DIR_MODE = 0o1770
SYSUSERS_TIMEOUT = 30.0

# POSIX ACLs as Linux stores them in the system.posix_acl_access extended attribute.
ACL_XATTR = "system.posix_acl_access"
ACL_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_ENTRY = struct.Struct("<HHI")


def prepare(spec: ProcessSpec, root: Path = Path("/")) -> None:
    """Everything ``spec.user`` needs before its unit starts (nothing for root or the core's
    own account); PluginError naming the plugin when a step fails."""
    if spec.user in (None, "root"):
        return
    account = ensure_user(spec, root)
    try:
        if spec.own_dir is not None:
            hand_over(spec.name, spec.own_dir, account.pw_uid, account.pw_gid)
            hidden = spec.hidden_dir if spec.sandbox else None
            grant_traverse(spec.own_dir.parent, account.pw_uid, hidden)
        for socket in spec.connects_to:
            grant_connect(socket, account.pw_uid)
    except OSError as exc:
        raise PluginError(spec.name, f"cannot prepare files for user {spec.user}: {exc}") from None


#: A key file handed to the plugin's account: readable by it alone, not even writable.
CREDENTIAL_MODE = 0o400


def prepare_local(spec: ProcessSpec) -> tuple[int, int] | None:
    """The embedded backend's counterpart of ``prepare`` (the core is root, no systemd): the
    (uid, gid) ``spec`` runs as, with its checkout handed over, its key file (0400) and the core's
    socket granted to that uid alone, and every directory on the way searchable by it (no
    listing). None for root. The account must exist: PluginError naming it otherwise."""
    if spec.user in (None, "root"):
        return None
    assert spec.user is not None
    try:
        account = pwd.getpwnam(spec.user)
    except KeyError:
        raise PluginError(
            spec.name,
            f'user "{spec.user}" does not exist on this host (the plugin\'s user, or [aigis] '
            "plugin_user, in aigis.toml; the packages create aigis-plugin)",
        ) from None
    uid, gid = account.pw_uid, account.pw_gid
    if uid == 0:
        return None
    try:
        if spec.own_dir is not None:
            hand_over(spec.name, spec.own_dir, uid, gid)
            grant_traverse(spec.own_dir.parent, uid)
        for var in spec.credentials:
            hand_over_file(Path(spec.env[var]), uid, gid)
        for socket in spec.connects_to:
            grant_connect(socket, uid)
    except OSError as exc:
        raise PluginError(spec.name, f"cannot prepare files for user {spec.user}: {exc}") from None
    return uid, gid


def retire_foreign_key(plugin: str, path: Path, user: str | None) -> bool:
    """Delete ``path`` (the plugin's key) when an account other than root, the core's and
    ``user``'s holds it: the account the plugin ran as before, which other plugins may share
    and which may keep a copy. The core then makes a new key. True when it was deleted."""
    try:
        holder = os.stat(path, follow_symlinks=False).st_uid
    except FileNotFoundError:
        return False
    allowed = {0, os.geteuid()}
    with contextlib.suppress(KeyError):
        allowed.add(pwd.getpwnam(user).pw_uid if user else os.geteuid())
    if holder in allowed:
        return False
    os.unlink(path)
    log.warning(
        'rotated: key of plugin "%s" (%s was held by uid %d; the plugin now runs as %s)',
        plugin,
        path,
        holder,
        user or "the core's account",
        **about(plugin),
    )
    return True


#: Run by /bin/sh as the plugin's account: enter the working directory ($0) with that account's
#: permissions, then become the plugin's argv.
_ENTER = 'cd -- "$0" && exec "$@"'


def entered_as_account(argv: tuple[str, ...], cwd: Path) -> tuple[tuple[str, ...], Path]:
    """(argv, cwd) that start ``argv`` in ``cwd`` entered after the switch to the plugin's
    account: the working directory lies in the checkout the plugin may rewrite, and a start
    entering it as root would follow a link planted there into a directory closed to it. Pure."""
    return ("/bin/sh", "-c", _ENTER, str(cwd), *argv), Path("/")


def hand_over_file(path: Path, uid: int, gid: int) -> None:
    """Make ``path`` (a key the core wrote) ``uid``'s, mode 0400, and its directory searchable
    by ``uid``; a symlink is refused, never followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, CREDENTIAL_MODE)
    finally:
        os.close(fd)
    grant_traverse(path.parent, uid)


def sysusers_line(spec: ProcessSpec) -> str:
    """The sysusers.d(5) line of the plugin's own account (and its group of the same name)."""
    home = str(spec.own_dir) if spec.own_dir is not None else "/"
    return f"u {spec.user} - {quote(f'AIGIS plugin {spec.name}', False)} {quote(home, False)} -\n"


def ensure_user(spec: ProcessSpec, root: Path = Path("/")) -> pwd.struct_passwd:
    """The account ``spec.user``; the plugin's own one is created once with systemd-sysusers
    (a fragment in /run/sysusers.d), an account the operator named must exist."""
    assert spec.user is not None
    try:
        return pwd.getpwnam(spec.user)
    except KeyError:
        if spec.user != plugin_user(spec.name):
            raise PluginError(
                spec.name, f'user "{spec.user}" (aigis.toml) does not exist on this host'
            ) from None
    fragment = root / SYSUSERS_DIR / f"{spec.user}.conf"
    try:
        fragment.parent.mkdir(parents=True, exist_ok=True)
        fragment.write_text(f"# Written by AIGIS for plugin {spec.name}.\n" + sysusers_line(spec))
        fragment.chmod(0o644)
        # --root: never the host's /etc when the supervisor manages another root (tests)
        where = [] if root == Path("/") else [f"--root={root}"]
        done = subprocess.run(
            ["systemd-sysusers", *where, str(fragment)],
            capture_output=True,
            text=True,
            timeout=SYSUSERS_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PluginError(spec.name, f"cannot create user {spec.user}: {exc}") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        raise PluginError(spec.name, f"systemd-sysusers could not create {spec.user}: {reason}")
    try:
        account = pwd.getpwnam(spec.user)
    except KeyError:
        raise PluginError(spec.name, f"systemd-sysusers did not create {spec.user}") from None
    log.info(
        'created: user %s (uid %d) for plugin "%s"',
        spec.user,
        account.pw_uid,
        spec.name,
        **about(spec.name),
    )
    return account


def hand_over(plugin: str, own_dir: Path, uid: int, gid: int) -> int:
    """Give the plugin's directory to ``uid:gid``: everything in it except KEEP_ROOTS; the
    directory itself stays root's (sticky, group ``gid`` may write). Returns files changed."""
    top = os.open(own_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(top, 0, gid)
        os.fchmod(top, OWN_DIR_MODE)
    finally:
        os.close(top)
    changed = 0
    for dirpath, dirnames, filenames, dirfd in os.fwalk(own_dir, follow_symlinks=False):
        if dirpath == str(own_dir):
            dirnames[:] = [d for d in dirnames if d not in KEEP_ROOTS]
            filenames = [f for f in filenames if f not in KEEP_ROOTS]
        for name in (*dirnames, *filenames):
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile by the running plugin
            if (st.st_uid, st.st_gid) == (uid, gid):
                continue
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                # A hard link to a file outside the directory would hand that file over too.
                log.warning(
                    'kept: %s/%s (%d hard links) not given to plugin "%s"',
                    dirpath,
                    name,
                    st.st_nlink,
                    plugin,
                    **about(plugin),
                )
                continue
            os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
            changed += 1
    return changed


def grant_traverse(directory: Path, uid: int, hidden: Path | None = None) -> None:
    """Let ``uid`` pass through ``directory`` and its parents where others may not (search
    only, no listing); directories inside ``hidden`` are not needed (the sandbox's tmpfs)."""
    for path in (directory, *directory.parents):
        if hidden is not None and path.is_relative_to(hidden):
            continue
        if not os.stat(path).st_mode & 0o001:
            grant(path, uid, 0o1)


def grant_connect(socket: Path, uid: int) -> None:
    """Let ``uid`` connect to ``socket``: read-write on it, search on its directory (ACL entries
    for that uid only; the group and other bits stay as they are)."""
    grant_traverse(socket.parent, uid)
    grant(socket, uid, 0o6)


def grant(path: Path, uid: int, perms: int) -> None:
    """Add ``perms`` for ``uid`` to the access ACL of ``path`` (not following symlinks)."""
    st = os.stat(path, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{path} is a symlink")
    try:
        current = os.getxattr(path, ACL_XATTR, follow_symlinks=False)
    except OSError:
        current = b""
    entries = decode_acl(current) if current else acl_from_mode(st.st_mode)
    updated = with_user(entries, uid, perms)
    if updated != entries:
        os.setxattr(path, ACL_XATTR, encode_acl(updated), follow_symlinks=False)


def acl_from_mode(mode: int) -> list[tuple[int, int, int]]:
    """The minimal ACL equivalent to the permission bits of ``mode``."""
    return [
        (USER_OBJ, (mode >> 6) & 7, UNDEFINED_ID),
        (GROUP_OBJ, (mode >> 3) & 7, UNDEFINED_ID),
        (OTHER, mode & 7, UNDEFINED_ID),
    ]


def with_user(entries: list[tuple[int, int, int]], uid: int, perms: int) -> list:
    """``entries`` with ``perms`` added for ``uid`` and the mask recomputed (a minimal ACL
    gets one); sorted as the kernel requires (by tag, then id)."""
    by_key = {(tag, ident): p for tag, p, ident in entries if tag != MASK}
    by_key[(USER, uid)] = by_key.get((USER, uid), 0) | perms
    group_class = [p for (tag, _), p in by_key.items() if tag in (GROUP_OBJ, USER, GROUP)]
    mask = 0
    for p in group_class:
        mask |= p
    old_mask = [p for tag, p, _ in entries if tag == MASK]
    if old_mask:
        mask |= old_mask[0]  # never take away what the mask already allowed
    by_key[(MASK, UNDEFINED_ID)] = mask
    return sorted(((tag, p, ident) for (tag, ident), p in by_key.items()), key=_acl_order)


def _acl_order(entry: tuple[int, int, int]) -> tuple[int, int]:
    return entry[0], entry[2]


def encode_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The xattr value for ``entries`` of (tag, perms, id)."""
    return struct.pack("<I", ACL_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def decode_acl(value: bytes) -> list[tuple[int, int, int]]:
    """(tag, perms, id) entries of an xattr value."""
    (version,) = struct.unpack_from("<I", value)
    if version != ACL_VERSION or (len(value) - 4) % _ENTRY.size:
        raise OSError(f"unexpected POSIX ACL format (version {version}, {len(value)} bytes)")
    return [_ENTRY.unpack_from(value, off) for off in range(4, len(value), _ENTRY.size)]
