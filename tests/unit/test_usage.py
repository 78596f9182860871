"""Plugin usage from /proc: parsing a stat line and summing a process tree (pure parts)."""

from __future__ import annotations

import os

from aigis._supervise.usage import (
    UNSET,
    Usage,
    parse_stat,
    process_usage,
    tree_usage,
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
    found = unit_usage(bus, units)
    assert found == {"a": Usage(cpu_seconds=2.5, memory_bytes=4096)}
    assert bus.asked == [(list(units.values()), ("CPUUsageNSec", "MemoryCurrent"))]  # one batch
    assert unit_usage(bus, {}) == {}
