"""Tables from results (pure): one per measure with absolute figures and AIGIS / peer ratios from
the same run, the issue's goal for AIGIS and whether it is met, and a Markdown summary."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.fleet.measure import Result

SUBJECT = "AIGIS"

#: n -> tool -> value: one measure across the run
Grid = dict[int, dict[str, float | None]]
#: (n, grid) -> (goal text, met? None when it does not apply or cannot be judged)
Goal = Callable[[int, Grid], tuple[str, bool | None]]


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _no_goal(n: int, grid: Grid) -> tuple[str, bool | None]:
    return "", None


def _at_most(limits: dict[int, float], unit: str) -> Goal:
    def goal(n: int, grid: Grid) -> tuple[str, bool | None]:
        if n not in limits:
            return "", None
        value = grid[n].get(SUBJECT)
        return f"<= {limits[n]:g} {unit}", None if value is None else value <= limits[n]

    return goal


SYSTEMD = "AIGIS systemd"


def _systemd_at_most(limits: dict[int, float], unit: str) -> Goal:
    """A goal for the systemd backend's column (the issue's systemd targets)."""

    def goal(n: int, grid: Grid) -> tuple[str, bool | None]:
        if n not in limits:
            return "", None
        value = grid[n].get(SYSTEMD)
        return f"{SYSTEMD} <= {limits[n]:g} {unit}", None if value is None else value <= limits[n]

    return goal


def _systemd_only(value: Callable[[Result], float | None]) -> Callable[[Result], float | None]:
    return lambda r: value(r) if r.tool == SYSTEMD else None


def _start_goal(n: int, grid: Grid) -> tuple[str, bool | None]:
    if n != 1000:
        return "", None
    row = grid[n]
    # the peers are the other tools, not another AIGIS backend ("AIGIS systemd")
    mine = row.get(SUBJECT)
    peers = [v for t, v in row.items() if not t.startswith(SUBJECT)]
    if mine is None or not peers or any(v is None for v in peers):
        return "<= 5 s and <= 0.4x each peer", None
    return "<= 5 s and <= 0.4x each peer", mine <= 5 and all(
        mine <= 0.4 * v for v in peers if v is not None
    )


def _flat_goal(n: int, grid: Grid) -> tuple[str, bool | None]:
    if n != 1000 or 100 not in grid:
        return "", None
    at_100, at_1000 = grid[100].get(SUBJECT), grid[1000].get(SUBJECT)
    if at_100 is None or at_1000 is None:
        return "<= 1.5x the N=100 figure", None
    return "<= 1.5x the N=100 figure", at_1000 <= 1.5 * at_100


def _threads_goal(n: int, grid: Grid) -> tuple[str, bool | None]:
    if n == 0 or 0 not in grid:
        return "", None
    idle, now = grid[0].get(SUBJECT), grid[n].get(SUBJECT)
    if idle is None or now is None:
        return "= idle (N=0)", None
    return "= idle (N=0)", now == idle


@dataclass(frozen=True)
class Measure:
    """A row family: how to read it from a Result, its unit and the goal for AIGIS."""

    key: str
    title: str
    unit: str
    value: Callable[[Result], float | None]
    goal: Goal = _no_goal
    digits: int = 2


def _per_plugin_ms(r: Result) -> float | None:
    return None if r.start_s is None or not r.n else 1000 * r.start_s / r.n


def _ms(values: list[float]) -> float | None:
    m = _med(values)
    return None if m is None else 1000 * m


MEASURES: tuple[Measure, ...] = (
    Measure("start", "launch -> all N plugins running", "s", lambda r: r.start_s, _start_goal),
    Measure("per_plugin", "launch cost per plugin", "ms", _per_plugin_ms, _flat_goal),
    Measure(
        "rss",
        "supervisor RSS, all running",
        "MiB",
        lambda r: r.rss_mib,
        _at_most({0: 30, 1000: 45}, "MiB"),
        1,
    ),
    Measure(
        "threads",
        "supervisor threads, all running",
        "",
        lambda r: None if r.threads is None else float(r.threads),
        _threads_goal,
        0,
    ),
    Measure(
        "stop", "SIGTERM -> all plugins gone", "s", lambda r: r.stop_s, _at_most({1000: 3}, "s")
    ),
    Measure("exit", "SIGTERM -> supervisor exited", "s", lambda r: r.exit_s),
    Measure(
        "restart",
        "kill -9 -> plugin running again, beyond the delay (median of 10)",
        "ms",
        lambda r: _ms(r.restart_s),
        _at_most({10: 50, 100: 50, 1000: 50}, "ms"),
        0,
    ),
    Measure(
        "status",
        "status command, wall (median of 5)",
        "ms",
        lambda r: _ms(r.status_s),
        _at_most({100: 100, 1000: 300}, "ms"),
        0,
    ),
    Measure(
        "systemd_start",
        "systemd backend: start of aigis.service -> all N units running",
        "s",
        _systemd_only(lambda r: r.start_s),
        _systemd_at_most({100: 3, 1000: 30}, "s"),
    ),
    Measure(
        "systemd_status",
        "systemd backend: states of all N units over D-Bus, as status reads them (median of 5)",
        "ms",
        _systemd_only(lambda r: _ms(r.backend_status_s)),
        _systemd_at_most({1000: 500}, "ms"),
        0,
    ),
    Measure(
        "restart_one",
        "restart one plugin among N via the control command -> new process running (median)",
        "ms",
        lambda r: _ms(r.restart_one_s),
        digits=0,
    ),
    Measure(
        "reload_one",
        "config reload with one plugin changed among N -> its new process running",
        "ms",
        lambda r: None if r.reload_one_s is None else 1000 * r.reload_one_s,
        digits=0,
    ),
)


def fmt(value: float | None, digits: int, unit: str = "") -> str:
    """``value`` with ``digits`` decimals and its unit; ``-`` when not measured."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" {unit}" if unit else "")


def ratio(mine: float | None, theirs: float | None) -> str:
    """``mine / theirs`` as ``0.42x``; ``-`` when either is missing or the peer's is zero."""
    if mine is None or theirs is None or theirs == 0:
        return "-"
    return f"{mine / theirs:.2f}x"


def verdict(met: bool | None) -> str:
    """Whether a goal is met, for a table cell."""
    return {True: "yes", False: "**no**", None: ""}[met]


def grid_of(measure: Measure, results: Sequence[Result]) -> Grid:
    """``measure`` for every (N, tool); the median over rounds when a pair ran several times."""
    samples: dict[int, dict[str, list[float]]] = {}
    for r in results:
        row = samples.setdefault(r.n, {}).setdefault(r.tool, [])
        value = measure.value(r)
        if value is not None:
            row.append(value)
    return {n: {tool: _med(vs) for tool, vs in row.items()} for n, row in sorted(samples.items())}


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines
    )


def measure_table(measure: Measure, results: Sequence[Result], tools: Sequence[str]) -> str:
    """One measure: a row per N that has figures, the figure per tool, AIGIS / each peer, the
    goal and whether AIGIS meets it."""
    grid = grid_of(measure, results)
    peers = [t for t in tools if t != SUBJECT]
    header = ["N", *tools, *(f"{SUBJECT}/{p}" for p in peers), "goal", "met"]
    rows = []
    for n, row in grid.items():
        if all(v is None for v in row.values()):
            continue
        goal, met = measure.goal(n, grid)
        rows.append(
            [
                str(n),
                *(fmt(row.get(t), measure.digits) for t in tools),
                *(ratio(row.get(SUBJECT), row.get(p)) for p in peers),
                goal,
                verdict(met),
            ]
        )
    unit = f" ({measure.unit})" if measure.unit else ""
    return f"### {measure.title}{unit}\n\n" + markdown(header, rows)


def summary_table(results: Sequence[Result], tools: Sequence[str]) -> str:
    """Every measure at every N in one Markdown table, for the README."""
    peers = [t for t in tools if t != SUBJECT]
    header = ["measure", "N", *tools, *(f"{SUBJECT}/{p}" for p in peers), "goal", "met"]
    rows = []
    for measure in MEASURES:
        grid = grid_of(measure, results)
        for n, row in grid.items():
            if all(v is None for v in row.values()):
                continue
            goal, met = measure.goal(n, grid)
            rows.append(
                [
                    measure.title,
                    str(n),
                    *(fmt(row.get(t), measure.digits, measure.unit) for t in tools),
                    *(ratio(row.get(SUBJECT), row.get(p)) for p in peers),
                    goal,
                    verdict(met),
                ]
            )
    return markdown(header, rows)
