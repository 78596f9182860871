"""Plugin usage under systemd: CPU and memory come from the plugin unit's cgroup (read over
D-Bus), and the core's metrics are served on its HTTP listener inside the box."""

from __future__ import annotations

import json

import pytest

from .box import Box, wait_until
from .test_service import PYTHON, Aigis

pytestmark = pytest.mark.systemd

FETCH = """\
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as answer:  # a loaded machine
    sys.stdout.write(answer.read().decode())
"""


@pytest.fixture
def aigis(box: Box) -> Aigis:
    return Aigis(box)


def test_status_shows_the_units_cgroup_usage_and_metrics_are_served(aigis: Aigis) -> None:
    aigis.examples()
    aigis.write_config('http = "127.0.0.1:9120"')
    aigis.box.systemctl("start", "aigis")
    rows = wait_until(
        lambda: (r := aigis.status()) and r["oracle"]["memory_bytes"] and r, 20, "oracle's usage"
    )
    for name in ("oracle", "clock"):
        unit = f"aigis-plugin@{name}.service"
        memory, cpu = aigis.prop(unit, "MemoryCurrent"), aigis.prop(unit, "CPUUsageNSec")
        if memory == "[not set]" or cpu == "[not set]":
            # No memory/cpu controller in the box's cgroup tree (hosts with v1 controllers):
            # the reading falls back to the unit's process tree from /proc.
            rss = aigis.box.run("ps", "-o", "rss=", "-p", str(rows[name]["pid"])).stdout
            assert rows[name]["memory_bytes"] >= int(rss) * 1024 * 0.5, name
        else:
            assert 0.5 * int(memory) <= rows[name]["memory_bytes"] <= 2 * int(memory), name
            assert rows[name]["cpu_seconds"] <= int(cpu) / 1e9 + 0.01, name
        assert rows[name]["cpu_seconds"] is not None
    assert rows["dnd"]["memory_bytes"] is None  # core plugins live in the core's process
    assert aigis.ctl("call", "dnd.roll", "6")[0] == 0
    out = aigis.box.run(PYTHON, "-c", FETCH, "http://127.0.0.1:9120/metrics").stdout
    assert 'aigis_skill_calls_total{caller="aigisctl",skill="dnd.roll"} 1.0' in out
    assert 'aigis_plugin_memory_bytes{plugin="oracle"}' in out
    page = json.loads(
        aigis.box.run(PYTHON, "-c", FETCH, "http://127.0.0.1:9120/status.json").stdout
    )
    assert {p["name"] for p in page["plugins"]} == {"dnd", "oracle", "clock"}


def test_status_while_the_core_is_down_still_shows_usage(aigis: Aigis) -> None:
    aigis.examples()
    aigis.write_config()
    aigis.dropin("60-no-restart.conf", "[Service]\nRestart=no\n")
    aigis.box.systemctl("start", "aigis")
    aigis.box.run("kill", "-9", str(aigis.main_pid("aigis.service")))
    aigis.wait_prop("aigis.service", "ActiveState", "failed")
    code, out, err = aigis.ctl("status", "--json")
    assert code == 3, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["clock"]["state"] == "running"
    assert rows["clock"]["memory_bytes"] > 0 and rows["clock"]["cpu_seconds"] is not None
