"""Plugin usage from /proc (parsing a stat line, summing a process tree) and from a unit's
cgroup (its path, its files' parsing, the D-Bus fallback), with fake trees and buses."""

from __future__ import annotations

import os
from pathlib import Path

from aigis._supervise.usage import (
    CGROUP_READ,
    UNSET,
    Usage,
    UsageReader,
    cgroup_usage,
    parse_cpu_stat,
    parse_memory_current,
    parse_stat,
    process_usage,
    tree_usage,
    unit_cgroup,
    unit_usage,
)

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def test_a_stat_line_with_spaces_and_parentheses_in_the_name():
    fields = ["S", "7", "1", "1", "0", "-1", "0", "0", "0", "0", "0", "30", "12"] + ["0"] * 8
    fields += ["99"]  # rss, field 24
    line = b"1234 (a (weird) name) " + " ".join(fields).encode()
    assert parse_stat(line) == (7, 42.0, 99)


def test_a_tree_sums_its_descendants_only():
    stats = {
        10: (1, 1.0 * TICKS, 100),  # plugin a
        11: (10, 2.0 * TICKS, 50),  # its child
        12: (11, 0.5 * TICKS, 10),  # its grandchild
        20: (1, 4.0 * TICKS, 7),  # plugin b
        30: (1, 9.0 * TICKS, 9),  # someone else
    }
    found = tree_usage({"a": 10, "b": 20, "gone": 99}, stats)
    assert set(found) == {"a", "b"}
    assert found["a"].cpu_seconds == 3.5 and found["a"].memory_bytes == 160 * PAGE
    assert found["b"].cpu_seconds == 4.0 and found["b"].memory_bytes == 7 * PAGE


def test_this_process_reads_as_using_memory():
    found = process_usage({"me": os.getpid()})
    assert found["me"].memory_bytes > 1_000_000
    assert process_usage({}) == {}


class FakeBus:
    """Answers ``unit_properties`` from a table, recording what was asked."""

    def __init__(self, values: dict[str, dict[str, int]]) -> None:
        self.values, self.asked = values, []

    def unit_properties(self, units, names):  # noqa: ANN001, ANN201
        self.asked.append((list(units), tuple(names)))
        return {u: self.values[u] for u in units if u in self.values}


def test_unit_usage_reads_the_cgroup_and_leaves_out_what_systemd_does_not_account():
    bus = FakeBus(
        {
            "aigis-plugin@a.service": {"CPUUsageNSec": 2_500_000_000, "MemoryCurrent": 4096},
            "aigis-plugin@b.service": {"CPUUsageNSec": UNSET, "MemoryCurrent": UNSET},
        }
    )
    units = {n: f"aigis-plugin@{n}.service" for n in ("a", "b", "c")}
    found = unit_usage(bus, units, root="/nonexistent")  # no cgroup files: over D-Bus
    assert found == {"a": Usage(cpu_seconds=2.5, memory_bytes=4096)}
    assert bus.asked == [(list(units.values()), ("CPUUsageNSec", "MemoryCurrent"))]  # one batch
    assert unit_usage(bus, {}) == {}
    assert bus.asked == [(list(units.values()), ("CPUUsageNSec", "MemoryCurrent"))]


CPU_STAT = b"""usage_usec 2500000
user_usec 2000000
system_usec 500000
nr_periods 0
"""


def _cgroup(root: Path, unit: str, cpu: bytes | None, memory: bytes | None) -> None:
    """A fake cgroup directory of ``unit`` under ``root``, with the files given."""
    path = root / unit_cgroup(unit)
    path.mkdir(parents=True)
    if cpu is not None:
        (path / "cpu.stat").write_bytes(cpu)
    if memory is not None:
        (path / "memory.current").write_bytes(memory)


def test_a_plugin_units_cgroup_is_in_its_templates_slice_with_systemds_escaping():
    # As on a systemd 252 box: ControlGroup of aigis-plugin@my-plugin.service.
    assert unit_cgroup("aigis-plugin@my\\x2dplugin.service") == (
        "system.slice/system-aigis\\x2dplugin.slice/aigis-plugin@my\\x2dplugin.service"
    )
    assert unit_cgroup("aigis.service") == "system.slice/aigis.service"


def test_cgroup_files_are_parsed_and_garbage_reads_as_nothing():
    assert parse_cpu_stat(CPU_STAT) == 2_500_000
    assert parse_cpu_stat(b"user_usec 3\n") is None
    assert parse_cpu_stat(b"usage_usec lots\n") is None
    assert parse_cpu_stat(b"") is None
    assert parse_memory_current(b"4096\n") == 4096
    assert parse_memory_current(b"max\n") is None
    assert parse_memory_current(b"") is None


def test_usage_is_read_from_cgroup_files_and_only_unreadable_cgroups_are_left_to_the_bus(
    tmp_path: Path,
):
    units = {n: f"aigis-plugin@{n}.service" for n in ("a", "nomem", "gone", "junk")}
    _cgroup(tmp_path, units["a"], CPU_STAT, b"4096\n")
    _cgroup(tmp_path, units["nomem"], CPU_STAT, None)  # no memory controller
    _cgroup(tmp_path, units["junk"], b"usage_usec ?\n", b"1\n")
    found, unreadable = cgroup_usage(units, str(tmp_path))
    assert found == {"a": Usage(cpu_seconds=2.5, memory_bytes=4096)}
    # Only a cgroup that cannot be read at all may be worth a D-Bus question: where cpu.stat
    # exists but memory.current does not, systemd has no MemoryCurrent either.
    assert unreadable == {"gone"}
    bus = FakeBus({units["gone"]: {"CPUUsageNSec": 1_000_000_000, "MemoryCurrent": 8}})
    assert unit_usage(bus, units, root=str(tmp_path)) == {
        "a": Usage(cpu_seconds=2.5, memory_bytes=4096),
        "gone": Usage(cpu_seconds=1.0, memory_bytes=8),
    }
    assert bus.asked == [([units["gone"]], ("CPUUsageNSec", "MemoryCurrent"))]


def test_a_cgroup_file_is_read_within_a_bound(tmp_path: Path):
    unit = "aigis-plugin@big.service"
    _cgroup(tmp_path, unit, b"x" * CGROUP_READ + b"\nusage_usec 1\n", b"1\n")
    assert cgroup_usage({"big": unit}, str(tmp_path)) == ({}, set())


def test_the_reader_asks_the_bus_only_for_cgroups_it_cannot_read(tmp_path: Path):
    units = {n: f"aigis-plugin@{n}.service" for n in ("a", "b")}
    _cgroup(tmp_path, units["a"], CPU_STAT, b"4096\n")
    _cgroup(tmp_path, units["b"], CPU_STAT, b"8192\n")
    reader = UsageReader("systemd", root=str(tmp_path))
    bus = reader._bus = FakeBus({})  # type: ignore[assignment]
    found = reader.read({"a": 1, "b": 2})
    assert found == {
        "a": Usage(cpu_seconds=2.5, memory_bytes=4096),
        "b": Usage(cpu_seconds=2.5, memory_bytes=8192),
    }
    assert bus.asked == []
    # A cgroup gone (cgroup v1 reads the same): that unit over D-Bus, then its process tree.
    found = reader.read({"a": 1, "me": os.getpid()})
    assert bus.asked == [(["aigis-plugin@me.service"], ("CPUUsageNSec", "MemoryCurrent"))]
    assert found["a"].memory_bytes == 4096 and found["me"].memory_bytes > 1_000_000
