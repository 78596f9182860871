"""``aigisctl top``'s screen from two views of the core (pure)."""

from __future__ import annotations

from aigis._metrics import Metrics
from aigis._top import cpu_percent, cpu_time, latency, render, size, skill_rows


def view(metrics: Metrics, at: float, oracle_cpu: float = 1.0, pid: int = 42) -> dict:
    return {
        "time": at,
        "core": {"version": "1.0", "summary": "2 running", "supervisor": "embedded",
                 "rss_bytes": 30 << 20, "threads": 9},
        "metrics": metrics.snapshot(),
        "plugins": [
            {"name": "dnd", "type": "core", "state": "loaded", "pid": None, "restarts": 0,
             "uptime": 65.0, "cpu_seconds": None, "memory_bytes": None},
            {"name": "oracle", "type": "internal", "state": "running", "pid": pid,
             "restarts": 1, "uptime": 3700.0, "cpu_seconds": oracle_cpu,
             "memory_bytes": 22 << 20},
        ],
    }  # fmt: skip


def test_busiest_skill_over_the_interval_comes_first_with_its_rate():
    metrics = Metrics()
    for _ in range(100):
        metrics.observe_call("dnd.ALIGNMENTS", "plugin", 0.0001, started=False)
    before = view(metrics, 100.0)
    for _ in range(20):
        metrics.observe_call("dnd.roll", "plugin", 0.002, started=False)
    metrics.observe_call("dnd.roll", "aigisctl", 0.002, "ValueError", started=False)
    rows = skill_rows(before, view(metrics, 102.0))
    assert [r["skill"] for r in rows] == ["dnd.roll", "dnd.ALIGNMENTS"]
    assert rows[0]["rate"] == 10.5 and rows[0]["calls"] == 21 and rows[0]["errors"] == 1
    assert 0.001 < rows[0]["p50"] <= 0.0025  # the interval's calls, not everything since start
    assert rows[1]["rate"] == 0 and rows[1]["p50"] is not None  # idle: latency of all it saw


def test_without_an_earlier_view_there_is_no_rate_and_no_cpu_share():
    metrics = Metrics()
    metrics.observe_call("dnd.roll", "plugin", 0.002, started=False)
    assert skill_rows(None, view(metrics, 1.0))[0]["rate"] is None
    assert cpu_percent(None, view(metrics, 1.0)) == {}


def test_cpu_share_over_the_interval_and_none_across_a_restart():
    metrics = Metrics()
    assert cpu_percent(view(metrics, 10.0, 1.0), view(metrics, 12.0, 1.5)) == {"oracle": 25.0}
    assert cpu_percent(view(metrics, 10.0, 1.0), view(metrics, 12.0, 0.1, pid=43)) == {}


def test_the_screen_lists_plugins_then_skills_and_fits_the_terminal():
    metrics = Metrics()
    metrics.observe_call("dnd.roll", "plugin", 0.00004, started=False)
    lines = render(view(metrics, 1.0), view(metrics, 2.0, 1.2), width=80, height=20)
    assert lines[0].startswith("AIGIS 1.0  2 running  (embedded)  core 30.0M, 9 threads")
    assert lines[2].split() == ["PLUGIN", "TYPE", "STATE", "CPU%", "CPU", "MEM", "RESTARTS",
                                "UPTIME"]  # fmt: skip
    assert lines[3].split() == ["dnd", "core", "loaded", "-", "-", "-", "0", "1m05s"]
    assert lines[4].split() == ["oracle", "internal", "running", "20.0", "1.2s", "22.0M", "1",
                                "1h01m"]  # fmt: skip
    assert lines[6].split() == ["SKILL", "CALLS/S", "CALLS", "P50", "P99", "ERRORS"]
    assert lines[7].split()[:3] == ["dnd.roll", "0.0", "1"]
    assert lines[-1] == "q: quit"
    assert all(len(line) <= 80 for line in lines)
    assert len(render(None, view(metrics, 2.0), width=30, height=5)) == 5
    snapshot = render(None, view(metrics, 2.0), interactive=False)
    assert snapshot[-1].startswith("dnd.roll") and "q: quit" not in snapshot


def test_no_calls_yet_says_so():
    lines = render(None, view(Metrics(), 1.0))
    assert "SKILL  (no calls yet)" in lines


def test_units():
    assert [size(None), size(512), size(2048), size(5 << 30)] == ["-", "512B", "2.0K", "5.0G"]
    assert [latency(None), latency(0.00004), latency(0.0123), latency(2.5)] == [
        "-", "40µs", "12.3ms", "2.50s",
    ]  # fmt: skip
    assert [cpu_time(None), cpu_time(0.44), cpu_time(125.0)] == ["-", "0.4s", "2m05s"]
