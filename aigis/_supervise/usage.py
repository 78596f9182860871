"""What plugin processes cost: CPU time and memory, from /proc (a process and its descendants)
or from a unit's cgroup as systemd accounts it (its cgroup v2 files, else over D-Bus). Readers
take pids or unit names, so they work the same whichever backend started the processes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from aigis._supervise.dbus import Systemd

#: systemd reports an unset (not accounted) numeric property as the largest uint64.
UNSET = (1 << 64) - 1
#: Where the unified (cgroup v2) hierarchy is mounted; systemd's units are below it.
CGROUP_ROOT = "/sys/fs/cgroup"
#: At most this much of a cgroup file is read (cpu.stat is a few hundred bytes).
CGROUP_READ = 8192
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Usage:
    """CPU seconds used (user + system, since the process or unit started) and memory in use."""

    cpu_seconds: float
    memory_bytes: int


def parse_stat(data: bytes) -> tuple[int, float, int]:
    """``(ppid, cpu ticks, rss pages)`` from the text of /proc/PID/stat (pure)."""
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[1]), float(int(rest[11]) + int(rest[12])), int(rest[21])


def tree_usage(
    roots: Mapping[str, int], stats: Mapping[int, tuple[int, float, int]]
) -> dict[str, Usage]:
    """Each root pid's usage summed over it and its descendants, from ``stats`` (pid ->
    ``parse_stat``); a root absent from ``stats`` is left out (pure). Descendants that left the
    tree (double forks re-parented elsewhere) are not counted; RSS of shared pages counts once
    per process."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu, _rss) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, Usage] = {}
    for name, root in roots.items():
        if root not in stats:
            continue
        ticks, pages, todo, seen = 0.0, 0, [root], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            _ppid, cpu, rss = stats[pid]
            ticks += cpu
            pages += rss
            todo.extend(children.get(pid, ()))
        out[name] = Usage(cpu_seconds=ticks / _TICKS, memory_bytes=pages * _PAGE)
    return out


def read_stats() -> dict[int, tuple[int, float, int]]:
    """``parse_stat`` of every live process (one pass over /proc)."""
    stats: dict[int, tuple[int, float, int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as file:
                    stats[int(entry.name)] = parse_stat(file.read())
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    return stats


def _stat(pid: int) -> tuple[int, float, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return parse_stat(file.read())
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


def _children(pid: int) -> list[int] | None:
    """Children of every thread of ``pid`` (``/proc/PID/task/TID/children``); None when the
    kernel does not offer that file."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                found.extend(int(child) for child in file.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None
        except OSError:
            continue
    return found


def tree_stats(roots: Mapping[str, int], limit: int = 10_000) -> dict[int, tuple[int, float, int]]:
    """``parse_stat`` of the roots and their descendants only, walking the children lists (a
    few reads per process, not a pass over every process); a full pass when the kernel has no
    children lists. At most ``limit`` processes."""
    stats: dict[int, tuple[int, float, int]] = {}
    todo = list(roots.values())
    while todo and len(stats) < limit:
        pid = todo.pop()
        if pid in stats:
            continue
        stat = _stat(pid)
        if stat is None:
            continue
        stats[pid] = stat
        children = _children(pid)
        if children is None:
            return read_stats()
        todo.extend(children)
    return stats


def process_usage(roots: Mapping[str, int]) -> dict[str, Usage]:
    """Usage of each named process tree (``{plugin: main pid}``), read from /proc."""
    if not roots:
        return {}
    return tree_usage(roots, tree_stats(roots))


def unit_cgroup(unit: str) -> str:
    """The cgroup of a system service below the cgroup root, where systemd puts it by default
    (pure): an instance ``P@I.service`` in the slice ``system-P.slice`` (P escaped as a unit
    name: ``-`` is ``\\x2d``), any other service in ``system.slice``. Unit names begin with a
    letter, so none needs cgroup escaping (a ``_`` prefix)."""
    prefix, at, _instance = unit.partition("@")
    if not at:
        return f"system.slice/{unit}"
    escaped = "".join(
        c if (c.isascii() and c.isalnum()) or c in ":_." else f"\\x{ord(c):02x}" for c in prefix
    )
    return f"system.slice/system-{escaped}.slice/{unit}"


def parse_cpu_stat(data: bytes) -> int | None:
    """``usage_usec`` from the text of a cgroup's cpu.stat, or None (pure)."""
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"usage_usec":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def parse_memory_current(data: bytes) -> int | None:
    """The byte count in a cgroup's memory.current, or None (pure)."""
    try:
        return int(data.strip())
    except ValueError:
        return None


def _read_small(path: str) -> bytes:
    """At most CGROUP_READ bytes of ``path`` (one read: cgroup files are generated whole)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, CGROUP_READ)
    finally:
        os.close(fd)


def cgroup_usage(
    units: Mapping[str, str], root: str = CGROUP_ROOT
) -> tuple[dict[str, Usage], set[str]]:
    """Usage of each named unit (``{plugin: unit}``) from its cgroup v2 files: ``cpu.stat``
    (usage_usec) and ``memory.current``, what systemd itself reads for CPUUsageNSec and
    MemoryCurrent. Returns the usage found and the names whose cgroup could not be read at all
    (no unified hierarchy, not running, no permission): only those may be worth asking systemd.
    A unit with cpu.stat but no memory.current (no memory controller) is in neither: systemd
    cannot account it either."""
    found: dict[str, Usage] = {}
    unreadable: set[str] = set()
    for name, unit in units.items():
        base = f"{root}/{unit_cgroup(unit)}"
        try:
            cpu = parse_cpu_stat(_read_small(f"{base}/cpu.stat"))
        except OSError:
            unreadable.add(name)
            continue
        try:
            memory = parse_memory_current(_read_small(f"{base}/memory.current"))
        except OSError:
            continue  # no memory controller for this cgroup
        if cpu is not None and memory is not None:
            found[name] = Usage(cpu_seconds=cpu / 1e6, memory_bytes=memory)
    return found, unreadable


def bus_usage(bus: Systemd, units: Mapping[str, str]) -> dict[str, Usage]:
    """Usage of each named unit's cgroup (``{plugin: unit}``) as systemd reports it over D-Bus:
    CPUUsageNSec and MemoryCurrent, two Gets per unit. A unit whose accounting is off (or that
    is not running) is left out."""
    if not units:
        return {}
    values = bus.unit_properties(list(units.values()), ("CPUUsageNSec", "MemoryCurrent"))
    out: dict[str, Usage] = {}
    for name, unit in units.items():
        cpu, memory = (
            values.get(unit, {}).get("CPUUsageNSec"),
            values.get(unit, {}).get("MemoryCurrent"),
        )
        if not isinstance(cpu, int) or not isinstance(memory, int) or UNSET in (cpu, memory):
            continue
        out[name] = Usage(cpu_seconds=cpu / 1e9, memory_bytes=memory)
    return out


def unit_usage(bus: Systemd, units: Mapping[str, str], root: str = CGROUP_ROOT) -> dict[str, Usage]:
    """Usage of each named unit's cgroup (``{plugin: unit}``): read from its cgroup files, and
    over D-Bus only for the units whose cgroup cannot be read here (cgroup v1). A unit whose
    accounting is off (or that is not running) is left out."""
    found, unreadable = cgroup_usage(units, root)
    if unreadable:
        found.update(bus_usage(bus, {n: u for n, u in units.items() if n in unreadable}))
    return found


class UsageReader:
    """Reads plugin usage the way the backend allows: a unit's cgroup under systemd (its files,
    or over D-Bus where they cannot be read; the process tree when accounting is off), the
    process tree otherwise."""

    def __init__(self, backend: str, *, bus: str = "SYSTEM", root: str = CGROUP_ROOT) -> None:
        self.backend = backend
        self.root = root
        self._address = bus
        self._bus: Systemd | None = None

    def read(self, pids: Mapping[str, int]) -> dict[str, Usage]:
        """``{plugin: Usage}`` of the plugins whose main process is ``pids[plugin]``."""
        found: dict[str, Usage] = {}
        if self.backend == "systemd" and pids:
            from aigis._supervise.dbus import Systemd, SystemdError
            from aigis._supervise.units import unit_name

            units = {name: unit_name(name) for name in pids}
            found, unreadable = cgroup_usage(units, self.root)
            if unreadable:  # cgroup v1: ask systemd (the bus is opened on first need)
                try:
                    if self._bus is None:
                        self._bus = Systemd(self._address, timeout=2.0)
                    asked = {n: u for n, u in units.items() if n in unreadable}
                    found.update(bus_usage(self._bus, asked))
                except (OSError, SystemdError):
                    pass
        rest = {name: pid for name, pid in pids.items() if name not in found}
        found.update(process_usage(rest))
        return found

    def close(self) -> None:
        """Close the bus connection, if one was opened."""
        if self._bus is not None:
            self._bus.close()
            self._bus = None


def own_usage() -> dict[str, float]:
    """This process: resident memory (bytes), threads, CPU seconds (user + system)."""
    rss, threads = 0, 0
    try:
        with open("/proc/self/status", "rb") as file:
            for line in file:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Threads:"):
                    threads = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    times = os.times()
    return {"rss_bytes": rss, "threads": threads, "cpu_seconds": times.user + times.system}
