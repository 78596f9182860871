"""The benchmark runner's pure parts: generated configs (valid for each tool), the process
table's plugin mapping, ratios, goals and Markdown tables. No benchmark runs here."""

from __future__ import annotations

import argparse
import configparser
from pathlib import Path

import pytest

from aigis._config import parse_config
from aigis._manifest import parse_manifest
from aigis._reload import diff
from benchmarks.fleet import report
from benchmarks.fleet.measure import Result, plugin_index
from benchmarks.fleet.proctable import Proc
from benchmarks.fleet.tools import (
    SLEEP_BASE,
    aigis_config,
    aigis_manifest,
    circus_config,
    plugin_argv,
    supervisord_config,
)
from benchmarks.run import parse_ns, parse_tools, rotate

SLEEP = "/usr/bin/sleep"
CFG = Path("/bench/aigis.toml")


def test_aigis_config_is_valid_with_n_external_plugins_embedded_and_no_restart_delay():
    config = parse_config(aigis_config(3), CFG)
    assert [(p.table, p.name, p.source) for p in config.plugins] == [
        ("external", "p0000", "plugins/p0000"),  # resolved against the config's directory
        ("external", "p0001", "plugins/p0001"),
        ("external", "p0002", "plugins/p0002"),
    ]
    assert config.settings.supervisor == "embedded"
    assert config.settings.restart_delay == 0
    assert config.settings.state_dir == Path("/bench/state")


def test_aigis_config_with_one_plugin_changed_reloads_that_plugin_only():
    plan = diff(parse_config(aigis_config(3), CFG), parse_config(aigis_config(3, changed=1), CFG))
    assert [e.name for e in plan.changed] == ["p0001"]
    assert (plan.added, plan.removed, plan.settings_changed) == ((), (), ())


def test_peer_configs_with_one_plugin_changed_differ_in_that_section_only(tmp_path):
    for render in (
        lambda changed: supervisord_config(3, SLEEP, tmp_path, 4096, changed),
        lambda changed: circus_config(3, SLEEP, tmp_path, changed),
    ):
        before, after = configparser.ConfigParser(), configparser.ConfigParser()
        before.read_string(render(None))
        after.read_string(render(2))
        differing = [
            name
            for name in set(before.sections()) | set(after.sections())
            if not before.has_section(name)
            or not after.has_section(name)
            or dict(before[name]) != dict(after[name])
        ]
        assert differing in (["program:p0002"], ["env:p0002"]), differing


def test_aigis_manifest_is_an_external_plugin_running_its_own_sleep_and_restarting():
    root = Path("/bench/state/ext/p0007")
    manifest = parse_manifest(aigis_manifest(7, SLEEP), "AIGIS.config", root, "p0007")
    assert manifest.plugin_type == "external"
    assert manifest.entrypoint == root
    assert manifest.launch == (SLEEP, str(SLEEP_BASE + 7))
    assert manifest.restart is not None and manifest.restart >= 10
    assert manifest.warnings == ()


def test_supervisord_config_has_n_programs_restarting_at_once(tmp_path):
    parser = configparser.ConfigParser()
    parser.read_string(supervisord_config(2, SLEEP, tmp_path, 4096))
    assert parser["supervisord"]["nodaemon"] == "true"
    assert parser["supervisord"]["minfds"] == "4096"
    assert parser["program:p0001"]["command"] == f"{SLEEP} {SLEEP_BASE + 1}"
    assert parser["program:p0001"]["autorestart"] == "true"
    assert [s for s in parser.sections() if s.startswith("program:")] == [
        "program:p0000",
        "program:p0001",
    ]


def test_circus_config_uses_ipc_endpoints_and_respawns_forever(tmp_path):
    parser = configparser.ConfigParser()
    parser.read_string(circus_config(2, SLEEP, tmp_path))
    assert parser["circus"]["endpoint"] == f"ipc://{tmp_path}/circus-ctl.sock"
    assert "stats_endpoint" not in parser["circus"]  # would start circusd-stats
    assert parser["watcher:p0000"]["cmd"] == f"{SLEEP} {SLEEP_BASE}"
    assert parser["watcher:p0000"]["max_retry"] == "-1"
    assert len([s for s in parser.sections() if s.startswith("watcher:")]) == 2


def _proc(*argv: str) -> Proc:
    return Proc(pid=10, ppid=1, pgid=10, state="S", start=1, argv=argv)


def test_plugin_index_recognises_only_plugin_processes():
    assert plugin_index(_proc(*plugin_argv(42, SLEEP)), SLEEP) == 42
    assert plugin_index(_proc(SLEEP, "5"), SLEEP) == 5 - SLEEP_BASE  # caller checks the range
    assert plugin_index(_proc("/usr/bin/python3", "-m", "aigis"), SLEEP) is None  # before exec
    assert plugin_index(_proc(SLEEP, "1d"), SLEEP) is None
    assert plugin_index(_proc(), SLEEP) is None  # a zombie or kernel thread has no argv


def test_ratio_and_fmt_show_missing_figures_as_a_dash():
    assert report.ratio(0.5, 2.0) == "0.25x"
    assert report.ratio(3.0, 1.0) == "3.00x"
    assert report.ratio(None, 1.0) == report.ratio(1.0, None) == report.ratio(1.0, 0.0) == "-"
    assert report.fmt(1.234, 1, "s") == "1.2 s"
    assert report.fmt(None, 1, "s") == "-"


def _results(aigis_start: float) -> list[Result]:
    return [
        Result("AIGIS", 100, start_s=0.4, restart_s=[0.01, 0.02, 0.9]),
        Result("supervisord", 100, start_s=1.5, restart_s=[1.0]),
        Result("circus", 100, start_s=1.3),
        Result("AIGIS", 1000, start_s=aigis_start),
        Result("supervisord", 1000, start_s=15.0),
        Result("circus", 1000, start_s=13.0),
    ]


def test_measure_table_has_figures_ratios_and_the_goal_verdict():
    start = next(m for m in report.MEASURES if m.key == "start")
    table = report.measure_table(start, _results(4.0), ["AIGIS", "supervisord", "circus"])
    lines = table.splitlines()
    assert lines[0] == "### launch -> all N plugins running (s)"
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "N", "AIGIS", "supervisord", "circus", "AIGIS/supervisord", "AIGIS/circus", "goal", "met",
    ]  # fmt: skip
    row_1000 = [c.strip() for c in lines[5].split("|")[1:-1]]
    assert row_1000 == ["1000", "4.00", "15.00", "13.00", "0.27x", "0.31x", row_1000[6], "yes"]
    slow = report.measure_table(start, _results(6.0), ["AIGIS", "supervisord", "circus"])
    assert slow.splitlines()[5].rstrip(" |").endswith("**no**")
    idle = [Result("AIGIS", 0, rss_mib=30.0), *_results(4.0)]  # N=0 has no launch figure
    assert report.measure_table(start, idle, ["AIGIS"]).count("\n| ") == 4  # header, rule, 2 N


def test_per_plugin_cost_goal_compares_n_1000_with_n_100():
    per_plugin = next(m for m in report.MEASURES if m.key == "per_plugin")
    grid = report.grid_of(per_plugin, _results(5.0))
    assert grid[100]["AIGIS"] == pytest.approx(4.0)  # ms per plugin
    assert per_plugin.goal(1000, grid)[1] is True  # 5.0 ms <= 1.5 x 4.0 ms
    assert per_plugin.goal(1000, report.grid_of(per_plugin, _results(6.5)))[1] is False


def test_restart_figure_is_the_median_in_ms_and_rounds_are_merged_by_median():
    restart = next(m for m in report.MEASURES if m.key == "restart")
    assert restart.value(_results(4.0)[0]) == pytest.approx(20.0)
    rounds = [Result("AIGIS", 10, rss_mib=v) for v in (30.0, 50.0, 31.0)]
    rss = next(m for m in report.MEASURES if m.key == "rss")
    assert report.grid_of(rss, rounds) == {10: {"AIGIS": 31.0}}


def test_summary_is_markdown_and_skips_unmeasured_rows():
    summary = report.summary_table(_results(4.0), ["AIGIS", "supervisord", "circus"])
    lines = summary.splitlines()
    assert lines[1].startswith("| ---")
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert not any("RSS" in line for line in lines)  # nothing measured it
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert ["launch -> all N plugins running", "1000", "4.00 s", "15.00 s", "13.00 s"] in [
        row[:5] for row in cells
    ]


def test_command_line_parsing_of_counts_and_tools():
    assert parse_ns("0,10,1_000") == [0, 10, 1000]
    with pytest.raises(argparse.ArgumentTypeError, match="--n"):
        parse_ns("ten")
    assert parse_tools("circus,aigis") == ["AIGIS", "circus"]
    with pytest.raises(argparse.ArgumentTypeError, match="runit"):
        parse_tools("runit")
    assert rotate(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_start_goal_is_judged_against_the_peers_only_not_the_systemd_column():
    start = next(m for m in report.MEASURES if m.key == "start")
    failed = Result("AIGIS systemd", 1000, errors=["all 1000 running not within 360 s"])
    results = [*_results(4.0), failed]
    assert start.goal(1000, report.grid_of(start, results)) == (
        "<= 5 s and <= 0.4x each peer",
        True,
    )


def test_internal_benchmark_config_and_manifests_are_valid(tmp_path):
    from benchmarks.fleet import internal

    config = parse_config(internal.internal_config(2), CFG)
    assert [(p.table, p.name) for p in config.plugins] == [
        ("core", "arrivals"), ("internal", "i0000"), ("internal", "i0001"),
    ]  # fmt: skip
    assert config.settings.supervisor == "embedded"
    core = parse_manifest(internal.ARRIVALS_MANIFEST, "AIGIS.config", tmp_path, "arrivals")
    assert core.plugin_type == "core"
    probe = parse_manifest(internal.INTERNAL_MANIFEST, "AIGIS.config", tmp_path, "i0000")
    assert (probe.plugin_type, probe.launch) == ("internal", "probe")
    compile(internal.ARRIVALS_CORE, "AIGIS.core", "exec")
    compile(internal.PROBE, "probe.py", "exec")


def test_internal_benchmark_table_judges_the_goal_at_100_only():
    from benchmarks.fleet.internal import InternalResult, internal_table

    met = internal_table(InternalResult(100, aigis_s=2.5, floor_s=1.25))
    assert met.splitlines()[-1] == (
        "| 100 internal plugins: launch -> all called once | 2.50 s | 1.25 s | 2.00x "
        "| <= 3 s | yes |"
    )
    assert internal_table(InternalResult(100, aigis_s=3.5, floor_s=1.0)).endswith("| no |")
    assert internal_table(InternalResult(10, aigis_s=1.0, floor_s=0.5)).endswith("|  |  |")
    assert internal_table(InternalResult(100, error="x")).endswith("| - | - | - | <= 3 s | - |")
