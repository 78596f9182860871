"""Host-side helpers of the systemd box (box.py): what to mask, cgroups, reaping, waiting.

Nothing here boots anything; ``units_to_mask()`` and ``generators_to_mask()`` can be called on
their own to review what a box masks before booting one.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_PREFIX = "aigis-box-"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Environment of every command run inside a box (pytest's own environment stays outside).
BOX_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}

#: Host unit directories (highest priority first) whose *.wants/*.requires/*.upholds we mask.
UNIT_DIRS = (
    "/etc/systemd/system.control",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)
GENERATOR_DIRS = tuple(
    f"{root}/systemd/{kind}"
    for kind in ("system-generators", "system-environment-generators")
    for root in ("/run", "/etc", "/usr/local/lib", "/usr/lib", "/lib")
)
#: Units the box needs; never masked even though the host's *.wants dirs link them.
KEEP = frozenset(
    {
        "systemd-journald.service",
        "systemd-journald.socket",
        "systemd-journald-dev-log.socket",
        "dbus.socket",
        "dbus.service",
    }
)
#: Masked whether or not the host links them (the first three are the /tmp wipers).
ALWAYS_MASK = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-clean.timer",
    "tmp.mount",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-sysusers.service",
    "systemd-sysctl.service",
    "systemd-remount-fs.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-journald-audit.socket",
    "postgresql.service",
    "getty@tty1.service",
    "emergency.service",
    "rescue.service",
)
MUST_MASK = ALWAYS_MASK[:3]

T = TypeVar("T")


class BoxError(RuntimeError):
    """A box failed to boot or to go away."""


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Return the first truthy ``check()``; raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def units_to_mask(unit_dirs: Iterable[str] = UNIT_DIRS) -> list[str]:
    """Every unit linked from a host *.wants/*.requires/*.upholds dir (and its link target), plus
    ``ALWAYS_MASK``, minus ``KEEP``."""
    names = set(ALWAYS_MASK)
    for base in map(Path, unit_dirs):
        for dep_dir in base.iterdir() if base.is_dir() else ():
            if not dep_dir.name.endswith((".wants", ".requires", ".upholds")):
                continue
            for link in dep_dir.iterdir():
                names.add(link.name)
                if link.is_symlink():
                    target = os.path.basename(os.readlink(link))
                    if target and target != "null":
                        names.add(target)
    return sorted(names - KEEP)


def generators_to_mask(generator_dirs: Iterable[str] = GENERATOR_DIRS) -> dict[str, list[str]]:
    """``{generator dir kind: [names]}`` of every generator on the host."""
    found: dict[str, set[str]] = {}
    for d in map(Path, generator_dirs):
        if d.is_dir():
            found.setdefault(d.name, set()).update(p.name for p in d.iterdir())
    return {kind: sorted(names) for kind, names in found.items()}


def _cgroup2_root() -> Path:
    """Mount point of the host's cgroup2 (``/sys/fs/cgroup/unified`` on hybrid hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(fields[0].split()[4])
    raise BoxError("no cgroup2 mount on the host")


def own_cgroup_dir() -> Path:
    """Our own cgroup2 directory (the parent of every box we create)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return _cgroup2_root() / line[3:].lstrip("/")
    raise BoxError("this process is in no cgroup2 hierarchy")


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """True while ``pid`` runs (zombies count as dead; ``start`` guards against pid reuse)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in "ZX" and (start is None or stat[1] == start)


def remove_cgroup(path: Path, timeout: float = 10) -> None:
    """Kill everything in the cgroup tree at ``path`` and remove it depth-first. Safe to race with
    another remover (a concurrent session reaping the same stale box)."""
    gone = (errno.ENOENT, errno.ENODEV)  # ENODEV: the cgroup was removed while we had it open
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError as e:
        if e.errno not in gone:
            raise

    def empty() -> bool:
        try:
            return "populated 0" in (path / "cgroup.events").read_text()
        except OSError as e:
            if e.errno not in gone:
                raise
            return True

    wait_until(empty, timeout, f"processes of {path} to exit")
    for sub, _dirs, _files in sorted(os.walk(path), key=lambda e: -e[0].count("/")):
        for _ in range(100):
            try:
                os.rmdir(sub)
                break
            except OSError as e:
                if e.errno in gone:
                    break
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
        else:
            raise BoxError(f"cgroup {sub} stays busy")


def reap_stale_boxes(parent: Path | None = None) -> list[Path]:
    """Remove boxes (cgroups, their processes and so mounts) whose owner process is gone."""
    parent = parent or own_cgroup_dir()
    reaped = []
    for path in parent.glob(CGROUP_PREFIX + "*"):
        try:
            owner, start = (int(x) for x in path.name[len(CGROUP_PREFIX) :].split("-")[:2])
        except ValueError:
            continue
        if not alive(owner, start):
            remove_cgroup(path)
            reaped.append(path)
    return reaped
