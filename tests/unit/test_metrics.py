"""The core's counters: what a call records, how labels stay bounded, the quantiles, and the
Prometheus text they become (parsed back with the client library's own parser)."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aigis._exposition import FAMILIES, exposition, families, registry
from aigis._metrics import (
    BUCKETS,
    MAX_ERROR_TYPES,
    MAX_LABEL,
    MAX_QUEUED,
    OVERFLOW,
    UNRESOLVED,
    Metrics,
    merged,
    quantile,
)
from aigis._states import State


def series(metrics: Metrics) -> dict[tuple[str, str], dict]:
    return {(r["skill"], r["caller"]): r for r in metrics.snapshot()["skills"]}


def test_a_call_records_count_latency_bucket_bytes_and_error_type():
    metrics = Metrics()
    metrics.call_started()
    metrics.observe_call("dnd.roll", "oracle", 0.0003, None, bytes_in=10, bytes_out=3)
    metrics.call_started()
    metrics.observe_call("dnd.roll", "oracle", 0.002, "ValueError", bytes_in=5)
    row = series(metrics)[("dnd.roll", "oracle")]
    assert row["calls"] == 2
    assert row["seconds"] == pytest.approx(0.0023)
    assert row["errors"] == {"ValueError": 1}
    assert (row["bytes_in"], row["bytes_out"]) == (15, 3)
    assert row["buckets"][BUCKETS.index(0.0005)] == 1  # 0.3 ms: the (0.25 ms, 0.5 ms] bucket
    assert row["buckets"][BUCKETS.index(0.0025)] == 1
    assert sum(row["buckets"]) == 2
    assert metrics.snapshot()["in_flight"] == 0


def test_a_duration_on_a_bound_falls_in_that_bucket_and_beyond_the_last_in_inf():
    metrics = Metrics()
    metrics.observe_call("s", "c", 0.001, started=False)
    metrics.observe_call("s", "c", 1e6, started=False)
    buckets = series(metrics)[("s", "c")]["buckets"]
    assert buckets[BUCKETS.index(0.001)] == 1  # le="0.001" includes 0.001
    assert buckets[-1] == 1 and len(buckets) == len(BUCKETS) + 1


def test_in_flight_counts_calls_started_and_not_yet_observed():
    metrics = Metrics()
    metrics.call_started()
    metrics.call_started()
    metrics.observe_call("s", "c", 0.1)
    assert metrics.snapshot()["in_flight"] == 1


def test_pairs_beyond_the_limit_are_counted_under_the_overflow_pair():
    metrics = Metrics(max_series=3)
    for index in range(5):
        metrics.observe_call(f"skill{index}", "c", 0.001, started=False)
    found = series(metrics)
    assert set(found) == {("skill0", "c"), ("skill1", "c"), ("skill2", "c"), (OVERFLOW, OVERFLOW)}
    assert found[(OVERFLOW, OVERFLOW)]["calls"] == 2
    metrics.observe_call("skill1", "c", 0.001, started=False)  # a known pair still counts
    assert series(metrics)[("skill1", "c")]["calls"] == 2


def test_error_types_beyond_the_limit_are_counted_as_other():
    metrics = Metrics()
    for index in range(MAX_ERROR_TYPES + 3):
        metrics.observe_call("s", "c", 0.001, f"Error{index}", started=False)
    errors = series(metrics)[("s", "c")]["errors"]
    assert len(errors) == MAX_ERROR_TYPES + 1
    assert errors[OVERFLOW] == 3


def test_long_label_values_are_cut_and_their_calls_add_up():
    metrics = Metrics()
    metrics.observe_call("x" * 1000, "c", 0.001, started=False)
    metrics.observe_call("x" * 1000, "c", 0.001, started=False)
    series(metrics)
    metrics.observe_call("x" * 1000, "c", 0.001, started=False)  # once the cut pair exists
    assert [(key, row["calls"]) for key, row in series(metrics).items()] == [
        (("x" * MAX_LABEL, "c"), 3)
    ]


def test_records_are_folded_in_before_the_queue_grows_past_its_bound():
    metrics = Metrics()
    for _ in range(MAX_QUEUED * 3):
        metrics.call_started()
        metrics.observe_call("s", "c", 0.001)
    assert len(metrics._queue) <= MAX_QUEUED
    assert metrics._series[("s", "c")].calls >= MAX_QUEUED * 2  # folded without a reader
    assert series(metrics)[("s", "c")]["calls"] == MAX_QUEUED * 3
    assert metrics.snapshot()["in_flight"] == 0


def test_fold_moves_queued_calls_into_the_counters():
    metrics = Metrics()
    metrics.call_started()
    metrics.observe_call("s", "c", 0.001)
    assert metrics._series == {}  # queued only: the call's path does no more
    metrics.fold()
    assert metrics._series[("s", "c")].calls == 1
    assert len(metrics._queue) == 0


def test_concurrent_calls_are_all_counted():
    metrics = Metrics()

    def hammer():
        for _ in range(5000):
            metrics.call_started()
            metrics.observe_call("s", "c", 0.0001, None, 1, 1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = series(metrics)[("s", "c")]
    assert row["calls"] == sum(row["buckets"]) == row["bytes_in"] == 20000
    assert metrics.snapshot()["in_flight"] == 0


def test_connections():
    metrics = Metrics()
    metrics.connection_opened("control")
    metrics.connection_opened("control")
    metrics.connection_closed("control")
    metrics.handshake_refused("http")
    snap = metrics.snapshot()
    assert snap["connections"] == {"control": 1}
    assert snap["accepted"] == {"control": 2}
    assert snap["refused"] == {"http": 1}


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.5, [0, 0, 0], None),  # empty
        (0.5, [10, 0, 0], 0.5),  # all in (0, 1]: the middle of it
        (0.5, [0, 10, 0], 1.5),  # all in (1, 2]
        (0.99, [50, 50, 0], 1.98),
        (0.5, [0, 0, 4], 2.0),  # in +Inf: the highest finite bound
    ],
)
def test_quantiles_interpolate_inside_the_bucket(q, counts, expected):
    assert quantile(q, [1.0, 2.0], counts) == (
        expected if expected is None else pytest.approx(expected)
    )


def test_merged_sums_callers_of_one_skill():
    metrics = Metrics()
    metrics.observe_call("s", "a", 0.001, "E", started=False)
    metrics.observe_call("s", "b", 0.001, started=False)
    metrics.observe_call("t", "b", 0.001, started=False)
    rows = merged(metrics.snapshot()["skills"])
    assert (rows["s"]["calls"], rows["s"]["errors"], rows["t"]["calls"]) == (2, 1, 1)


def view(metrics: Metrics) -> dict:
    plugin = {
        "name": "oracle", "state": "running", "restarts": 2, "uptime": 12.5,
        "last_exit": "exit 1", "cpu_seconds": 1.5, "memory_bytes": 2048,
    }  # fmt: skip
    core = {"rss_bytes": 1 << 20, "threads": 7}
    output = {"log_lines": {"oracle": 5}, "log_dropped_bytes": {"oracle": 100}}
    return {"metrics": {**metrics.snapshot(), **output}, "plugins": [plugin], "core": core}


def parsed(metrics: Metrics) -> dict[tuple, float]:
    text = exposition(registry(lambda: view(metrics))).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_exposition_parses_back_to_the_calls_made():
    metrics = Metrics()
    for _ in range(7):
        metrics.observe_call("dnd.roll", "aigisctl", 0.0003, None, 4, 2, started=False)
    metrics.observe_call("dnd.roll", "aigisctl", 0.02, "TypeError", started=False)
    found = parsed(metrics)
    key = (("caller", "aigisctl"), ("skill", "dnd.roll"))
    assert found[("aigis_skill_calls_total", key)] == 8
    assert found[("aigis_skill_errors_total", (key[0], ("error", "TypeError"), key[1]))] == 1
    assert found[("aigis_skill_call_duration_seconds_count", key)] == 8
    assert found[("aigis_skill_call_duration_seconds_sum", key)] == pytest.approx(0.0221)
    bucket = "aigis_skill_call_duration_seconds_bucket"
    assert found[(bucket, (key[0], ("le", "0.0005"), key[1]))] == 7
    assert found[(bucket, (key[0], ("le", "0.025"), key[1]))] == 8
    assert found[(bucket, (key[0], ("le", "+Inf"), key[1]))] == 8
    assert found[("aigis_skill_received_bytes_total", key)] == 28
    assert found[("aigis_skill_sent_bytes_total", key)] == 14
    assert found[("aigis_plugin_state", (("plugin", "oracle"), ("state", "running")))] == 1
    assert found[("aigis_plugin_state", (("plugin", "oracle"), ("state", "failed")))] == 0
    assert found[("aigis_plugin_restarts", (("plugin", "oracle"),))] == 2
    assert found[("aigis_plugin_cpu_seconds_total", (("plugin", "oracle"),))] == 1.5
    assert found[("aigis_plugin_memory_bytes", (("plugin", "oracle"),))] == 2048
    assert found[("aigis_plugin_log_lines_total", (("plugin", "oracle"),))] == 5
    assert found[("aigis_plugin_log_dropped_bytes_total", (("plugin", "oracle"),))] == 100
    info = ("aigis_plugin_last_exit_info", (("last_exit", "exit 1"), ("plugin", "oracle")))
    assert found[info] == 1
    assert found[("aigis_core_threads", ())] == 7
    assert ("process_resident_memory_bytes", ()) in found  # the standard process collector


def test_every_family_follows_the_naming_conventions_and_is_listed():
    metrics = Metrics()
    metrics.observe_call("s", "c", 0.1, "E", started=False)
    metrics.connection_opened("control")
    metrics.handshake_refused("control")
    names = []
    for family in families(view(metrics)):
        suffix = "_total" if family.type == "counter" else ""
        names.append(family.name + suffix)
        assert family.name.startswith("aigis_")
        assert family.documentation
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the library adds it
    assert sorted(names) == sorted(FAMILIES)
    assert {str(s) for s in State} <= {
        dict(s.labels)["state"]
        for f in families(view(metrics))
        if f.name == "aigis_plugin_state"
        for s in f.samples
    }


def test_a_recorded_path_is_dotted_and_a_missing_one_is_unresolved_when_folded():
    metrics = Metrics()
    start, record = metrics.recorder()
    for _ in range(3):
        start()
        record((("dnd", "roll"), "oracle", 300_000, None, 10, 3, True))
    start()
    record((None, "oracle", 1_000, "PermissionError", 4, 0, True))
    found = series(metrics)
    assert found[("dnd.roll", "oracle")]["calls"] == 3
    assert found[("dnd.roll", "oracle")]["seconds"] == pytest.approx(0.0009)
    assert found[("dnd.roll", "oracle")]["buckets"][BUCKETS.index(0.0005)] == 3
    assert found[(UNRESOLVED, "oracle")]["errors"] == {"PermissionError": 1}
    assert metrics.snapshot()["in_flight"] == 0


def test_a_path_and_its_dotted_name_count_in_one_series():
    metrics = Metrics()
    _start, record = metrics.recorder()
    record((("dnd", "roll"), "oracle", 1_000, None, 0, 0, False))
    metrics.observe_call("dnd.roll", "oracle", 0.000001, started=False)
    assert [(key, row["calls"]) for key, row in series(metrics).items()] == [
        (("dnd.roll", "oracle"), 2)
    ]
