"""``aigisctl logs`` of a plugin on another host: its journal there, over the core's ssh."""

from __future__ import annotations

import pytest

from aigis._ctl import main

REMOTE_LOGS = {"journal": "aigis-plugin@far.service", "ssh": ["ssh", "-S", "/run/c", "--", "web1"]}


def test_logs_of_a_remote_plugin_run_journalctl_there_over_the_core_ssh(monkeypatch, capsys):
    import aigis._ctl as ctl

    monkeypatch.setattr(ctl, "_control", lambda *args, **kw: REMOTE_LOGS)
    monkeypatch.setattr(ctl.os, "geteuid", lambda: 0)
    ran = []

    def execvp(program, argv):
        ran.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(ctl.os, "execvp", execvp)
    with pytest.raises(SystemExit):
        main(["logs", "far", "-n", "5", "-f"])
    assert ran == [[
        "ssh", "-S", "/run/c", "--", "web1",
        "journalctl -u aigis-plugin@far.service -n 5 --no-pager -f",
    ]]  # fmt: skip


def test_logs_of_a_remote_plugin_need_root(monkeypatch, capsys):
    import aigis._ctl as ctl

    monkeypatch.setattr(ctl, "_control", lambda *args, **kw: REMOTE_LOGS)
    monkeypatch.setattr(ctl.os, "geteuid", lambda: 1000)
    assert main(["logs", "far"]) == 1
    assert capsys.readouterr().err.strip() == (
        'aigisctl: "far" runs on another host: reading its journal there takes the core\'s ssh '
        "connection, which is root's"
    )
