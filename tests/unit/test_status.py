"""Status rows have one producer: the core's rows (either backend) and the rows built from systemd
while the core is down carry exactly the README's fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from aigis._states import UP, Kind, State
from aigis._status import STATUS_FIELDS, plugin_row, summary, unit_row
from aigis._supervise.base import Status
from aigis._supervise.unitstate import UnitState

README = Path(__file__).parents[2] / "README.md"


def documented_fields() -> tuple[str, ...]:
    """The keys the README lists for ``aigisctl status --json``."""
    text = README.read_text()
    start = text.index("`aigisctl status --json` prints a list of objects with these keys:")
    section = text[start : text.index("States:", start)]
    return tuple(re.findall(r"`(\w+)`", section.split("keys:", 1)[1]))


@dataclass
class FakePlugin:
    name: str = "p"
    plugin_type: Kind = Kind.EXTERNAL
    host: str = "localhost"
    state: State = State.LOADED
    reason: str = ""
    loaded_at: float = 100.0
    commit: str | None = "abc"
    supervised: bool = True
    source: str = "/src/p"
    ref: str | None = None


UNIT = UnitState(
    unit="aigis-plugin@p.service", load_state="loaded", active_state="active",
    sub_state="running", result="success", service_type="exec", restart="on-failure",
    n_restarts=1, start_limit_burst=3, main_pid=42, exec_main_status=0, exec_main_code=0,
    exec_main_start=150.0, state_change=150.0, job_id=0, need_reload=False,
)  # fmt: skip
EMBEDDED = Status("p", Kind.EXTERNAL, State.RUNNING, 42, 1, 150.0, 150.0, "exit 1", "started")
SYSTEMD = Status("p", Kind.EXTERNAL, State.RUNNING, 42, 1, 150.0, 150.0, None, "unit active")


def expected_fields() -> tuple[str, ...]:
    """The README's fields."""
    return documented_fields()


def test_the_readme_documents_exactly_the_fields():
    assert expected_fields() == STATUS_FIELDS


@dataclass
class FakeUsage:
    cpu_seconds: float = 1.23456
    memory_bytes: int = 4096


def test_rows_carry_usage_when_read_and_null_otherwise():
    row = plugin_row(FakePlugin(), EMBEDDED, now=200.0, usage=FakeUsage())
    assert (row["cpu_seconds"], row["memory_bytes"]) == (1.235, 4096)
    row = plugin_row(FakePlugin(), EMBEDDED, now=200.0)
    assert (row["cpu_seconds"], row["memory_bytes"]) == (None, None)
    row = unit_row(UNIT, now=200.0, usage=FakeUsage(2.0, 10))
    assert (row["cpu_seconds"], row["memory_bytes"]) == (2.0, 10)


@pytest.mark.parametrize(
    "row",
    [
        plugin_row(FakePlugin(), EMBEDDED, now=200.0),  # the core up, embedded backend
        plugin_row(FakePlugin(), SYSTEMD, now=200.0),  # the core up, systemd backend
        plugin_row(FakePlugin(), None, now=200.0),  # the supervisor could not be asked
        plugin_row(FakePlugin(plugin_type=Kind.CORE, supervised=False), None, now=200.0),
        unit_row(UNIT, now=200.0),  # the core down, read from systemd
    ],
    ids=["embedded", "systemd", "unknown", "core-plugin", "core-down"],
)
def test_every_producer_emits_exactly_the_documented_fields(row):
    assert tuple(row) == expected_fields()


def test_a_process_row_takes_the_supervisors_view():
    row = plugin_row(FakePlugin(), EMBEDDED, now=200.0)
    assert (row["state"], row["pid"], row["restarts"], row["uptime"]) == ("running", 42, 1, 50.0)
    assert (row["last_exit"], row["reason"], row["host"], row["commit"]) == (
        "exit 1",
        "started",
        "localhost",
        "abc",
    )


def test_a_supervised_plugin_without_a_snapshot_is_unknown():
    row = plugin_row(FakePlugin(), None, now=200.0)
    assert row["state"] == "unknown" and row["state"] not in UP


def test_a_unit_row_knows_nothing_of_the_cores_own_facts():
    row = unit_row(UNIT, now=200.0)
    assert (row["name"], row["type"], row["state"], row["pid"], row["uptime"]) == (
        "p",
        "external",
        "running",
        42,
        50.0,
    )
    assert (row["host"], row["source"], row["ref"], row["commit"]) == (None, None, None, None)


def test_summary_counts_states():
    rows = [{"state": "running"}, {"state": "failed"}, {"state": "running"}]
    assert summary(rows) == "1 failed, 2 running"
    assert summary([]) == "no plugins configured"
