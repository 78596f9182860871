"""The core's counters in the Prometheus text format, built with ``prometheus_client`` when
scraped (imported only when the HTTP listener is configured).

Names follow Prometheus conventions: ``aigis_`` prefix, ``_total`` counters, ``_seconds`` and
``_bytes`` units, one label per bounded dimension (skill, caller, error, plugin, listener).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from aigis._states import State
from aigis._version import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every metric family this module exposes (besides the standard ``process_*``), for the docs.
FAMILIES = (
    "aigis_build_info",
    "aigis_skill_calls_total",
    "aigis_skill_errors_total",
    "aigis_skill_call_duration_seconds",
    "aigis_skill_received_bytes_total",
    "aigis_skill_sent_bytes_total",
    "aigis_calls_in_flight",
    "aigis_plugin_state",
    "aigis_plugin_restarts",
    "aigis_plugin_uptime_seconds",
    "aigis_plugin_last_exit_info",
    "aigis_plugin_cpu_seconds_total",
    "aigis_plugin_memory_bytes",
    "aigis_plugin_log_lines_total",
    "aigis_plugin_log_dropped_bytes_total",
    "aigis_connections",
    "aigis_connections_accepted_total",
    "aigis_handshakes_refused_total",
    "aigis_core_resident_memory_bytes",
    "aigis_core_threads",
)


def families(view: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one ``view`` (what the control channel's ``top`` returns:
    ``metrics`` snapshot, ``plugins`` status rows, ``core`` facts). Pure."""
    snap, plugins, core = view["metrics"], view["plugins"], view["core"]
    info = GaugeMetricFamily("aigis_build_info", "AIGIS version", labels=["version"])
    info.add_metric([__version__], 1)
    yield info

    keys = ["skill", "caller"]
    calls = CounterMetricFamily(
        "aigis_skill_calls", "Skill calls, by skill and caller", labels=keys
    )
    errors = CounterMetricFamily(
        "aigis_skill_errors",
        "Skill calls that raised, by exception type",
        labels=[*keys, "error"],
    )
    latency = HistogramMetricFamily(
        "aigis_skill_call_duration_seconds", "Time to run a skill call", labels=keys
    )
    received = CounterMetricFamily(
        "aigis_skill_received_bytes", "Bytes of call requests received", labels=keys
    )
    sent = CounterMetricFamily("aigis_skill_sent_bytes", "Bytes of call replies sent", labels=keys)
    bounds = [*(repr(float(b)) for b in snap["bounds"]), "+Inf"]
    for row in snap["skills"]:
        labels = [row["skill"], row["caller"]]
        calls.add_metric(labels, row["calls"])
        for error, count in sorted(row["errors"].items()):
            errors.add_metric([*labels, error], count)
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, row["buckets"]):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric(labels, buckets, row["seconds"])
        received.add_metric(labels, row["bytes_in"])
        sent.add_metric(labels, row["bytes_out"])
    yield from (calls, errors, latency, received, sent)
    yield GaugeMetricFamily(
        "aigis_calls_in_flight", "Skill calls running now", value=snap["in_flight"]
    )

    yield from _plugin_families(plugins, snap)

    connections = GaugeMetricFamily(
        "aigis_connections", "Connections open now, by listener", labels=["listener"]
    )
    for listener, count in sorted(snap["connections"].items()):
        connections.add_metric([listener], count)
    accepted = CounterMetricFamily(
        "aigis_connections_accepted", "Connections accepted, by listener", labels=["listener"]
    )
    for listener, count in sorted(snap["accepted"].items()):
        accepted.add_metric([listener], count)
    refused = CounterMetricFamily(
        "aigis_handshakes_refused",
        "Connections refused (bad key or greeting, too many peers), by listener",
        labels=["listener"],
    )
    for listener, count in sorted(snap["refused"].items()):
        refused.add_metric([listener], count)
    yield from (connections, accepted, refused)
    yield GaugeMetricFamily(
        "aigis_core_resident_memory_bytes", "Resident memory of the core", value=core["rss_bytes"]
    )
    yield GaugeMetricFamily("aigis_core_threads", "Threads of the core", value=core["threads"])


def _plugin_families(plugins: list[dict[str, Any]], snap: dict[str, Any]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "aigis_plugin_state", "1 for the plugin's current state", labels=["plugin", "state"]
    )
    restarts = GaugeMetricFamily(
        "aigis_plugin_restarts",
        "Automatic restarts since the last start (a manual restart resets it)",
        labels=["plugin"],
    )
    uptime = GaugeMetricFamily(
        "aigis_plugin_uptime_seconds", "Seconds since the plugin started", labels=["plugin"]
    )
    last_exit = GaugeMetricFamily(
        "aigis_plugin_last_exit_info",
        "How the plugin's last process ended",
        labels=["plugin", "last_exit"],
    )
    cpu = CounterMetricFamily(
        "aigis_plugin_cpu_seconds",
        "CPU time of the plugin's processes (its cgroup under systemd)",
        labels=["plugin"],
    )
    memory = GaugeMetricFamily(
        "aigis_plugin_memory_bytes",
        "Memory of the plugin (cgroup under systemd, summed RSS otherwise)",
        labels=["plugin"],
    )
    lines = CounterMetricFamily(
        "aigis_plugin_log_lines",
        "Lines the plugin printed while the core logs its output (embedded backend)",
        labels=["plugin"],
    )
    dropped = CounterMetricFamily(
        "aigis_plugin_log_dropped_bytes",
        "Bytes of plugin output its log file could not store (a full disk)",
        labels=["plugin"],
    )
    for row in plugins:
        name = row["name"]
        for each in State:
            state.add_metric([name, str(each)], 1 if row["state"] == str(each) else 0)
        restarts.add_metric([name], row["restarts"])
        if row["uptime"] is not None:
            uptime.add_metric([name], row["uptime"])
        if row["last_exit"]:
            last_exit.add_metric([name, row["last_exit"]], 1)
        if row["cpu_seconds"] is not None:
            cpu.add_metric([name], row["cpu_seconds"])
        if row["memory_bytes"] is not None:
            memory.add_metric([name], row["memory_bytes"])
        if name in snap["log_lines"]:
            lines.add_metric([name], snap["log_lines"][name])
        if name in snap["log_dropped_bytes"]:
            dropped.add_metric([name], snap["log_dropped_bytes"][name])
    yield from (state, restarts, uptime, last_exit, cpu, memory, lines, dropped)


class _Collector:
    """Reads the core's view on every scrape."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        yield from families(self.read())


def registry(read: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry with the core's families (from ``read()``) and the standard process ones."""
    found = CollectorRegistry(auto_describe=False)
    found.register(_Collector(read))
    ProcessCollector(registry=found)
    return found


def exposition(found: CollectorRegistry) -> bytes:
    """The text a scrape gets."""
    return generate_latest(found)
