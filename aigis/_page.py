"""The read-only status page: what it shows (``page_data``, pure) and its three static files.

Plain HTML, CSS and a little JavaScript served by the core: no build step, no external asset,
no action, no plugin output. The data is an allowlist of fields (never a source URL or a secret);
the script fills the tables with ``textContent`` only and refreshes itself.
"""

from __future__ import annotations

from typing import Any

from aigis._metrics import merged, quantile

#: Status row fields the page shows (``source`` is left out: it may be a URL).
PLUGIN_FIELDS = (
    "name",
    "type",
    "state",
    "host",
    "pid",
    "restarts",
    "uptime",
    "last_exit",
    "reason",
    "cpu_seconds",
    "memory_bytes",
)
REFRESH_SECONDS = 2


def page_data(view: dict[str, Any]) -> dict[str, Any]:
    """What ``/status.json`` serves from the core's view (see ``Daemon.view``)."""
    snap = view["metrics"]
    per_skill = merged(snap["skills"])
    skills = []
    for entry in view["skills"]:
        path = entry["path"].removeprefix("aigis.")
        row = per_skill.pop(path, None)
        skills.append(_skill(path, entry["plugin"], row, snap["bounds"]))
    for path, row in sorted(per_skill.items()):  # called but not registered (now)
        skills.append(_skill(path, "", row, snap["bounds"]))
    return {
        "version": view["core"]["version"],
        "supervisor": view["core"]["supervisor"],
        "summary": view["core"]["summary"],
        "time": view["time"],
        "refresh": REFRESH_SECONDS,
        "plugins": [{k: row.get(k) for k in PLUGIN_FIELDS} for row in view["plugins"]],
        "skills": skills,
    }


def _skill(
    path: str, owner: str, row: dict[str, Any] | None, bounds: list[float]
) -> dict[str, Any]:
    calls = row["calls"] if row else 0
    return {
        "skill": path,
        "owner": owner,
        "calls": calls,
        "errors": row["errors"] if row else 0,
        "mean_seconds": row["seconds"] / calls if row and calls else None,
        "p50_seconds": quantile(0.5, bounds, row["buckets"]) if row else None,
        "p99_seconds": quantile(0.99, bounds, row["buckets"]) if row else None,
    }


HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>AIGIS status</title>
<link rel="stylesheet" href="status.css">
<script src="status.js" defer></script>
</head>
<body>
<header>
  <h1>AIGIS</h1>
  <span id="summary">loading&hellip;</span>
  <span id="updated" class="muted"></span>
</header>
<main>
<h2>Plugins</h2>
<table id="plugins">
<thead><tr><th>Name</th><th>Type</th><th>State</th><th>Host</th><th class="num">PID</th>
<th class="num">Restarts</th><th class="num">Uptime</th><th>Last exit</th><th class="num">CPU</th>
<th class="num">Memory</th><th>Reason</th></tr></thead>
<tbody></tbody>
</table>
<h2>Skills</h2>
<table id="skills">
<thead><tr><th>Skill</th><th>Owner</th><th class="num">Calls</th><th class="num">Errors</th>
<th class="num">Mean</th><th class="num">p50</th><th class="num">p99</th></tr></thead>
<tbody></tbody>
</table>
</main>
<footer class="muted">Read-only. Metrics for Prometheus: <a href="metrics">/metrics</a></footer>
</body>
</html>
"""

CSS = """body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
body { background: #fafafa; }
header { display: flex; gap: 1.5em; align-items: baseline; }
h1 { font-size: 1.4em; margin: 0; }
h2 { font-size: 1.1em; margin: 1.5em 0 .4em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; }
th, td { white-space: nowrap; }
td.reason { white-space: normal; }
th { background: #eee; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; }
.state-running, .state-loaded { color: #176f2c; font-weight: 600; }
.state-failed, .state-unknown { color: #b00020; font-weight: 600; }
.state-backoff, .state-starting, .state-stopping { color: #9a6700; font-weight: 600; }
.stale { opacity: .5; }
"""

JS = """"use strict";
(function () {
  function two(n) { return String(Math.floor(n)).padStart(2, "0"); }
  function duration(s) {
    if (s === null || s === undefined) return "-";
    s = Math.floor(s);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + two(s % 3600 / 60) + "m";
    return Math.floor(s / 86400) + "d" + two(s % 86400 / 3600) + "h";
  }
  function bytes(n) {
    if (n === null || n === undefined) return "-";
    var units = ["B", "K", "M", "G", "T"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + units[i];
  }
  function seconds(s) {
    if (s === null || s === undefined) return "-";
    if (s < 0.001) return (s * 1e6).toFixed(0) + "\\u00b5s";
    if (s < 1) return (s * 1e3).toFixed(1) + "ms";
    return s.toFixed(2) + "s";
  }
  function cpu(s) { return s === null || s === undefined ? "-" : s.toFixed(1) + "s"; }
  function row(cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) {
      var td = document.createElement("td");
      td.textContent = c[0];
      if (c[1]) td.className = c[1];
      tr.appendChild(td);
    });
    return tr;
  }
  function fill(id, rows) {
    var body = document.querySelector("#" + id + " tbody");
    body.replaceChildren.apply(body, rows);
  }
  function show(data) {
    document.getElementById("summary").textContent =
      data.summary + " \\u2014 AIGIS " + data.version + ", " + data.supervisor + " supervisor";
    document.getElementById("updated").textContent =
      "updated " + new Date(data.time * 1000).toLocaleTimeString();
    fill("plugins", data.plugins.map(function (p) {
      var tr = row([[p.name], [p.type], [p.state, "state-" + p.state], [p.host || "-"],
        [p.pid || "-", "num"], [p.restarts, "num"], [duration(p.uptime), "num"],
        [p.last_exit || ""], [cpu(p.cpu_seconds), "num"], [bytes(p.memory_bytes), "num"],
        [p.reason || "", "reason"]]);
      tr.dataset.plugin = p.name;
      return tr;
    }));
    fill("skills", data.skills.map(function (s) {
      var tr = row([[s.skill], [s.owner], [s.calls, "num"], [s.errors, "num"],
        [seconds(s.mean_seconds), "num"], [seconds(s.p50_seconds), "num"],
        [seconds(s.p99_seconds), "num"]]);
      tr.dataset.skill = s.skill;
      return tr;
    }));
    document.body.classList.remove("stale");
    document.body.dataset.loaded = "yes";
    return data.refresh;
  }
  function refresh() {
    fetch("status.json", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (data) { setTimeout(refresh, 1000 * show(data)); })
      .catch(function () { document.body.classList.add("stale"); setTimeout(refresh, 5000); });
  }
  refresh();
})();
"""
