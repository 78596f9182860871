"""``aigisctl top``'s screen, drawn from two views of the core (pure): plugins with state, CPU,
memory and restarts, then the busiest skills with calls/s, p50/p99 latency and errors over the
interval between the two views (since the core started when there is no earlier view)."""

from __future__ import annotations

from typing import Any

from aigis._metrics import merged, quantile

View = dict[str, Any]


def duration(seconds: float | None) -> str:
    """``42s``, ``5m07s``, ``3h12m``, ``2d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cpu_time(seconds: float | None) -> str:
    """``0.4s``, ``12.0s``, then as ``duration`` from a minute on; ``-`` for None."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else duration(seconds)


def size(count: int | None) -> str:
    """``512B``, ``12.3K``, ``45.6M``; ``-`` for None."""
    if count is None:
        return "-"
    value, unit = float(count), "B"
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            break
        value /= 1024
    return f"{int(value)}B" if unit == "B" else f"{value:.1f}{unit}"


def latency(seconds: float | None) -> str:
    """``85µs``, ``1.2ms``, ``2.50s``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def skill_rows(previous: View | None, current: View) -> list[dict[str, Any]]:
    """Per skill (all callers summed), busiest first: calls/s and latency quantiles over the
    interval, total calls and errors."""
    bounds = current["metrics"]["bounds"]
    now = merged(current["metrics"]["skills"])
    before = merged(previous["metrics"]["skills"]) if previous else {}
    elapsed = current["time"] - previous["time"] if previous else 0.0
    rows = []
    for path, row in now.items():
        old = before.get(path)
        calls = row["calls"] - (old["calls"] if old else 0)
        buckets = row["buckets"]
        if old:
            buckets = [a - b for a, b in zip(buckets, old["buckets"])]
        if previous and calls == 0:  # idle in the interval: latency over everything seen
            buckets = row["buckets"]
        rows.append(
            {
                "skill": path,
                "rate": calls / elapsed if elapsed > 0 else None,
                "calls": row["calls"],
                "errors": row["errors"],
                "p50": quantile(0.5, bounds, buckets),
                "p99": quantile(0.99, bounds, buckets),
                "interval_calls": calls,
            }
        )
    rows.sort(key=lambda r: (-r["interval_calls"], -r["calls"], r["skill"]))
    return rows


def cpu_percent(previous: View | None, current: View) -> dict[str, float]:
    """Per plugin, the share of one CPU used over the interval (only with an earlier view)."""
    if not previous:
        return {}
    elapsed = current["time"] - previous["time"]
    before = {r["name"]: r for r in previous["plugins"]}
    out = {}
    for row in current["plugins"]:
        old = before.get(row["name"])
        if elapsed <= 0 or old is None or row["cpu_seconds"] is None:
            continue
        if old["cpu_seconds"] is None or old["pid"] != row["pid"]:
            continue  # restarted meanwhile: no meaningful difference
        out[row["name"]] = max(0.0, row["cpu_seconds"] - old["cpu_seconds"]) / elapsed * 100
    return out


def table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; ``right``: indexes of right-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                  enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]  # fmt: skip


def render(
    previous: View | None,
    current: View,
    width: int = 100,
    height: int = 40,
    interactive: bool = True,
) -> list[str]:
    """The screen as lines, cut to ``width`` x ``height``; ``interactive``: with the key help."""
    core = current["core"]
    head = (
        f"AIGIS {core['version']}  {core['summary']}  ({core['supervisor']})  "
        f"core {size(core.get('rss_bytes'))}, {core.get('threads', '-')} threads, "
        f"{current['metrics']['in_flight']} calls in flight"
    )
    lines = [head, ""]
    cpu = cpu_percent(previous, current)
    plugins: list[tuple[str, ...]] = [
        ("PLUGIN", "TYPE", "STATE", "CPU%", "CPU", "MEM", "RESTARTS", "UPTIME")
    ]
    for row in current["plugins"]:
        share = cpu.get(row["name"])
        plugins.append(
            (
                row["name"],
                row["type"],
                row["state"],
                "-" if share is None else f"{share:.1f}",
                cpu_time(row["cpu_seconds"]),
                size(row["memory_bytes"]),
                str(row["restarts"]),
                duration(row["uptime"]),
            )
        )
    lines += table(plugins, right={3, 4, 5, 6, 7})
    lines.append("")
    skills: list[tuple[str, ...]] = [("SKILL", "CALLS/S", "CALLS", "P50", "P99", "ERRORS")]
    for row in skill_rows(previous, current):
        skills.append(
            (
                row["skill"],
                "-" if row["rate"] is None else f"{row['rate']:.1f}",
                str(row["calls"]),
                latency(row["p50"]),
                latency(row["p99"]),
                str(row["errors"]),
            )
        )
    if len(skills) == 1:
        lines.append("SKILL  (no calls yet)")
    else:
        lines += table(skills, right={1, 2, 3, 4, 5})
    if interactive:
        lines = lines[: max(1, height - 1)]
        lines.append("q: quit")
    return [line[:width] for line in lines[:height]]
