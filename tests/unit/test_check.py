"""``aigisctl check``: one line per problem naming file, line/key and plugin; no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aigis._ctl import main

GOOD = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'


def run_check(capsys, config: Path) -> tuple[int, list[str], str]:
    code = main(["check", "-c", str(config)])
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    return code, errors, out.out + out.err


def write_config(tmp_path: Path, body: str) -> Path:
    config = tmp_path / "aigis.toml"
    config.write_text(f'[aigis]\nstate_dir = "state"\n{body}')
    return config


def test_examples_config_is_valid(capsys, tmp_path):
    # A copy: a demo run leaves fetched plugins in examples/.state, which check would read.
    examples = Path(__file__).parents[2] / "examples"
    shutil.copytree(examples, tmp_path / "examples", ignore=shutil.ignore_patterns(".state"))
    code, errors, out = run_check(capsys, tmp_path / "examples" / "aigis.toml")
    assert (code, errors) == (0, []), out
    assert 'plugin "dnd": ok (core' in out


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[core]\nx = "unterminated\n', ":4: TOML syntax error"),
        ('[core]\nx = "src/a"\nx = "src/a"\n', ':5: [core] duplicate plugin name "x"'),
        ('[core]\n"a b" = "src/a"\n', ':4: [core] invalid plugin name "a b"'),
    ],
)
def test_config_problems(tmp_path, capsys, make_plugin, body, expected):
    make_plugin("a", GOOD, core="SKILLS = []\n")
    code, errors, out = run_check(capsys, write_config(tmp_path, body))
    assert code == 1
    assert len(errors) == 1 and expected in errors[0], out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (
            'PLUGIN_TYPE = "core"\nimport os\nENTRYPOINT = "{root}"\n',
            'plugin "a": {cfg}:2: only NAME = literal assignments are allowed',
        ),
        (
            'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nRESTART = "3"\n',
            "plugin \"a\": {cfg}:3: RESTART must be an integer >= 0, got '3'",
        ),
        ('PLUGIN_TYPE = "core"\n', 'plugin "a": {cfg}: ENTRYPOINT is required'),
        (
            'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}/nowhere"\n',
            'plugin "a": {cfg}: ENTRYPOINT {root}/nowhere is not a directory',
        ),
    ],
)
def test_manifest_problems(tmp_path, capsys, make_plugin, manifest, expected):
    root = make_plugin("a", manifest, core="SKILLS = []\n")
    make_plugin("b", GOOD, core="SKILLS = []\n")
    code, errors, out = run_check(
        capsys, write_config(tmp_path, '[core]\na = "src/a"\nb = "src/b"\n')
    )
    assert code == 1
    cfg = root / "AIGIS" / "AIGIS.config"
    assert len(errors) == 1, out
    assert errors[0].startswith("error: " + expected.format(cfg=cfg, root=root)), out
    assert 'plugin "b": ok' in out
    assert "Traceback" not in out


def test_core_syntax_missing_secret_and_unfetched_git(tmp_path, capsys, make_plugin):
    make_plugin("a", GOOD, core="SKILLS = [\n")
    make_plugin("s", GOOD + 'SECRETS = {"k": "{root}/"}\n', core="SKILLS = []\n")
    code, errors, out = run_check(
        capsys,
        write_config(
            tmp_path, '[core]\na = "src/a"\ns = "src/s"\ng = "https://example.invalid/g.git"\n'
        ),
    )
    assert code == 1
    assert errors[0].startswith('error: plugin "a": ') and ":1: syntax error" in errors[0]
    assert errors[1].startswith('error: plugin "s": missing secrets: ')
    assert 'plugin "g": not fetched yet from https://example.invalid/g.git' in out


def test_missing_config_file(tmp_path, capsys):
    code, errors, _ = run_check(capsys, tmp_path / "nope.toml")
    assert code == 1 and errors == [f"error: {tmp_path}/nope.toml: config file not found"]


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2


@pytest.mark.parametrize("command", [["check"], ["status"], ["skills"]])
def test_deeply_nested_config_is_one_line_for_every_command(tmp_path, capsys, command):
    config = tmp_path / "aigis.toml"
    config.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    code = main([*command, "-c", str(config)])
    out = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out.out + out.err
    lines = [line for line in out.err.splitlines() if "problem(s)" not in line]  # check's tally
    assert len(lines) == 1
    assert lines[0].endswith(f" {config}: TOML too deeply nested or too large (RecursionError)")


def test_nan_stop_timeout_fails_check(tmp_path, capsys):
    code, errors, _ = run_check(capsys, write_config(tmp_path, "stop_timeout = nan\n"))
    assert code == 1
    assert errors == [
        f"error: {tmp_path}/aigis.toml:3: [aigis] stop_timeout must be a number of seconds "
        "> 0 and <= 604800, got float nan"
    ]


def _plugin(root: Path, name: str, manifest: str) -> None:
    (root / name / "AIGIS").mkdir(parents=True)
    (root / name / "AIGIS" / "AIGIS.config").write_text(manifest)


def test_check_says_which_host_runs_each_plugin_without_connecting(capsys, tmp_path):
    _plugin(tmp_path, "near", 'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}"\nLAUNCH = ["x"]\n')
    _plugin(
        tmp_path, "far",
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "m"\nHOST = "web1"\n'
        'SYSTEM_REQUIREMENTS = ["only-on-web1"]\n',
    )  # fmt: skip
    config = write_config(
        tmp_path,
        'tcp = "[fd00::1]:7878"\n'
        '[hosts]\nweb1 = { address = "fd00::2", user = "root" }\nweb2 = "deploy@db2"\n'
        '[internal]\nfar = "far"\n[external]\nnear = { source = "near", host = "web1" }\n',
    )
    code, errors, out = run_check(capsys, config)
    assert (code, errors) == (0, []), out
    assert f'plugin "far": ok (internal, {tmp_path}/far, on host web1)' in out
    assert f'plugin "near": ok (external, {tmp_path}/near, on host web1)' in out
    assert 'host "web1": ssh root@fd00::2 port 22, python3; runs far, near' in out
    assert 'host "web2": ssh deploy@db2 port 22, python3; no plugin runs there' in out


def test_check_refuses_internal_plugins_elsewhere_without_a_core_address(capsys, tmp_path):
    _plugin(tmp_path, "far", 'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "m"\n')
    config = write_config(tmp_path, '[internal]\nfar = { source = "far", host = "web1" }\n')
    code, errors, _ = run_check(capsys, config)
    assert code == 1
    assert errors == [
        'error: plugin "far": internal plugins on host "web1" connect back to the core over '
        "TCP: set [aigis] tcp (and hosts.web1.core_address if they reach it elsewhere)"
    ]


def test_check_says_plugins_of_an_ssh_forwarded_host_call_back_through_ssh(capsys, tmp_path):
    _plugin(
        tmp_path, "far",
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "m"\nHOST = "web1"\n',
    )  # fmt: skip
    config = write_config(
        tmp_path,
        'tcp = "127.0.0.1:7878"\n'
        '[hosts]\nweb1 = { address = "fd00::2", core_address = "ssh:9000" }\n'
        '[internal]\nfar = "far"\n',
    )
    code, errors, out = run_check(capsys, config)
    assert (code, errors) == (0, []), out
    assert (
        'host "web1": ssh fd00::2 port 22, python3; runs far; internal plugins call back through '
        "the ssh connection (127.0.0.1:9000 on the host, forwarded to 127.0.0.1:7878)"
    ) in out


def test_check_refuses_an_ssh_forward_without_a_tcp_listener(capsys, tmp_path):
    _plugin(
        tmp_path, "far",
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "m"\nHOST = "web1"\n',
    )  # fmt: skip
    config = write_config(
        tmp_path,
        '[hosts]\nweb1 = { address = "fd00::2", core_address = "ssh" }\n[internal]\nfar = "far"\n',
    )
    code, errors, _ = run_check(capsys, config)
    assert code == 1
    assert errors == [
        'error: plugin "far": hosts.web1.core_address is "ssh", a forward to the core\'s TCP '
        "listener, but [aigis] tcp is none: set it to a fixed address and port (127.0.0.1:PORT "
        "is enough)"
    ]
