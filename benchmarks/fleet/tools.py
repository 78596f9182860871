"""The three supervisors under test: each renders its config for N ``sleep`` plugins (pure) and
knows how to launch itself and which control commands to time."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Plugin i runs ``sleep SLEEP_BASE+i``: a distinct argv per plugin, so the process table tells
#: which plugin a pid belongs to, and a pattern (``LEFTOVER_PATTERN``) finds any leftover.
SLEEP_BASE = 86_400_000
LEFTOVER_PATTERN = r"sleep 864[0-9]{5}$"
#: AIGIS counts restarts and gives up after RESTART of them; the runs kill a few dozen.
RESTART_BUDGET = 1000
#: circus respawns dead processes on a periodic check (default every 1 s; 0 is refused): a
#: short period is the nearest circus has to "restart delay 0", paid for with idle wakeups.
CIRCUS_CHECK_DELAY = 0.1


def plugin_name(i: int) -> str:
    """The name of plugin ``i`` in every tool: ``p0007``."""
    return f"p{i:04d}"


def plugin_argv(i: int, sleep: str) -> tuple[str, ...]:
    """The command plugin ``i`` runs (``sleep`` is the absolute path of sleep)."""
    return (sleep, str(SLEEP_BASE + i))


def sleep_path() -> str:
    """The absolute path of ``sleep``, the same for every tool (no PATH lookup differences)."""
    found = shutil.which("sleep")
    if found is None:
        raise RuntimeError("benchmark: no 'sleep' on PATH")
    return found


# --- configs (pure) ---------------------------------------------------------------------------


def aigis_manifest(i: int, sleep: str) -> str:
    """``AIGIS/AIGIS.config`` of external plugin ``i``."""
    launch = ", ".join(f'"{a}"' for a in plugin_argv(i, sleep))
    return (
        '"""A benchmark plugin: sleeps."""\n'
        'PLUGIN_TYPE = "external"\n'
        'ENTRYPOINT = "{root}"\n'
        f"LAUNCH = [{launch}]\n"
        f"RESTART = {RESTART_BUDGET}\n"
    )


def aigis_config(n: int, changed: int | None = None) -> str:
    """``aigis.toml`` for ``n`` plugins under ``plugins/``, embedded backend, restart delay 0;
    plugin ``changed`` gets another spelling of its source, which a reload sees as a change."""
    lines = [
        "[aigis]",
        'state_dir = "state"',
        'runtime_dir = "run"',
        'secrets_dir = "secrets"',
        'supervisor = "embedded"',
        "restart_delay = 0",
        "",
        "[external]",
    ]
    lines += [
        f'{plugin_name(i)} = "{"./" if i == changed else ""}plugins/{plugin_name(i)}"'
        for i in range(n)
    ]
    return "\n".join(lines) + "\n"


def supervisord_config(
    n: int, sleep: str, workdir: Path, minfds: int, changed: int | None = None
) -> str:
    """``supervisord.conf``: foreground, a Unix control socket, ``n`` programs that restart at
    once (supervisord has no restart delay setting: it restarts on its next loop tick);
    program ``changed`` gets an extra environment variable."""
    lines = [
        "[supervisord]",
        "nodaemon = true",
        f"logfile = {workdir}/supervisord.log",
        f"pidfile = {workdir}/supervisord.pid",
        f"childlogdir = {workdir}/childlogs",
        f"minfds = {minfds}",
        "",
        "[unix_http_server]",
        f"file = {workdir}/supervisor.sock",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl = unix://{workdir}/supervisor.sock",
    ]
    for i in range(n):
        lines += [
            "",
            f"[program:{plugin_name(i)}]",
            f"command = {' '.join(plugin_argv(i, sleep))}",
            "autorestart = true",
            "startsecs = 0",
            f"startretries = {RESTART_BUDGET}",
        ]
        if i == changed:
            lines.append('environment = BENCH_CHANGED="1"')
    return "\n".join(lines) + "\n"


def circus_config(n: int, sleep: str, workdir: Path, changed: int | None = None) -> str:
    """``circus.ini``: IPC endpoints (no TCP port to collide on), ``n`` watchers of one process
    each, respawned with no warmup delay on circus's next check (every ``CIRCUS_CHECK_DELAY``);
    watcher ``changed`` gets an extra environment variable."""
    lines = [
        "[circus]",
        f"endpoint = ipc://{workdir}/circus-ctl.sock",
        f"pubsub_endpoint = ipc://{workdir}/circus-pub.sock",
        "warmup_delay = 0",
        f"check_delay = {CIRCUS_CHECK_DELAY}",
    ]
    for i in range(n):
        lines += [
            "",
            f"[watcher:{plugin_name(i)}]",
            f"cmd = {' '.join(plugin_argv(i, sleep))}",
            "numprocesses = 1",
            "respawn = true",
            "warmup_delay = 0",
            "copy_env = true",
            "max_retry = -1",
        ]
        if i == changed:
            lines += ["", f"[env:{plugin_name(i)}]", "BENCH_CHANGED = 1"]
    return "\n".join(lines) + "\n"


# --- the tools --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """One supervisor: how to start it and the control commands the runs time."""

    name: str
    launch: tuple[str, ...]
    status: tuple[str, ...]
    restart_one: tuple[str, ...]  # followed by the plugin name
    reload: tuple[str, ...]  # re-read the config, apply only what changed
    change_one: Callable[[], object]  # rewrite the config with plugin 0 changed
    restart_delay: str  # the configured delay, as the table reports it


def write_aigis(workdir: Path, n: int, sleep: str, venv: Path) -> Tool:
    """AIGIS's config and ``n`` plugins in ``workdir``, each also pre-fetched into its state
    directory (so launch times supervision, not the one-time copy of the plugin sources)."""
    (workdir / "aigis.toml").write_text(aigis_config(n))
    for i in range(n):
        manifest = aigis_manifest(i, sleep)
        for base in (workdir / "plugins", workdir / "state" / "ext"):
            (base / plugin_name(i) / "AIGIS").mkdir(parents=True, exist_ok=True)
            (base / plugin_name(i) / "AIGIS" / "AIGIS.config").write_text(manifest)
    config = str(workdir / "aigis.toml")
    ctl = (str(venv / "bin" / "aigisctl"), "-c", config)
    return Tool(
        name="AIGIS",
        launch=(str(venv / "bin" / "aigis"), "-c", config, "--supervisor", "embedded"),
        status=(*ctl, "status", "--json"),
        restart_one=(*ctl, "restart"),
        reload=(*ctl, "reload"),
        change_one=lambda: (workdir / "aigis.toml").write_text(aigis_config(n, changed=0)),
        restart_delay="0 (restart_delay = 0)",
    )


def write_supervisord(workdir: Path, n: int, sleep: str, peers: Path, minfds: int) -> Tool:
    """supervisord's config in ``workdir``."""
    (workdir / "childlogs").mkdir(parents=True, exist_ok=True)
    config = workdir / "supervisord.conf"
    config.write_text(supervisord_config(n, sleep, workdir, minfds))
    ctl = (str(peers / "bin" / "supervisorctl"), "-c", str(config))
    return Tool(
        name="supervisord",
        launch=(str(peers / "bin" / "supervisord"), "-c", str(config)),
        status=(*ctl, "status"),
        restart_one=(*ctl, "restart"),
        reload=(*ctl, "update"),
        change_one=lambda: config.write_text(supervisord_config(n, sleep, workdir, minfds, 0)),
        restart_delay="not settable (restarts on its next ~1 s tick)",
    )


def write_circus(workdir: Path, n: int, sleep: str, peers: Path) -> Tool:
    """circus's config in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "circus.ini"
    config.write_text(circus_config(n, sleep, workdir))
    ctl = (str(peers / "bin" / "circusctl"), "--endpoint", f"ipc://{workdir}/circus-ctl.sock")
    return Tool(
        name="circus",
        launch=(str(peers / "bin" / "circusd"), str(config)),
        status=(*ctl, "status"),
        restart_one=(*ctl, "restart"),
        reload=(*ctl, "reloadconfig"),
        change_one=lambda: config.write_text(circus_config(n, sleep, workdir, 0)),
        restart_delay=f"0 (warmup_delay = 0), check_delay = {CIRCUS_CHECK_DELAY} s",
    )
