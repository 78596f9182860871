"""Unit names and drop-ins: pure rendering compared with golden files."""

from pathlib import Path

import pytest

from aigis._states import Kind
from aigis._supervise.base import ProcessSpec as UnitSpec
from aigis._supervise.units import (
    SANDBOX,
    plugin_of_unit,
    plugin_user,
    quote,
    render_dropin,
    systemd_escape,
    unit_name,
)

GOLDEN = Path(__file__).parents[1] / "fixtures" / "units"

INTERNAL = UnitSpec(
    name="oracle",
    kind=Kind.INTERNAL,
    argv=(
        "/usr/bin/python3",
        "-m",
        "aigis._runner",
        "--name",
        "oracle",
    ),
    cwd=Path("/var/lib/aigis/ext/oracle"),
    env={"PYTHONUNBUFFERED": "1", "AIGIS_ADDRESS": "/run/aigis/aigis.sock"},
    restart=3,
    restart_delay=1.0,
    restart_delay_max=60.0,
)
EXTERNAL = UnitSpec(
    name="my-clock",
    kind=Kind.EXTERNAL,
    argv=(
        "/bin/sh",
        "/var/lib/aigis/ext/my-clock/run 100%.sh",
        'say "$HOME"',
    ),
    cwd=Path("/var/lib/aigis/ext/my-clock"),
    env={"PYTHONUNBUFFERED": "1"},
    restart=None,
)

#: A default plugin as aigis.toml gives it: its own account, sandboxed, the authkey a credential.
SANDBOXED = UnitSpec(
    name="oracle",
    kind=Kind.INTERNAL,
    argv=("/usr/bin/python3", "-m", "aigis._runner", "--name", "oracle"),
    cwd=Path("/var/lib/aigis/ext/oracle"),
    env={
        "AIGIS_ADDRESS": "/run/aigis/aigis.sock",
        "AIGIS_AUTHKEY_FILE": "/var/lib/aigis/authkey",
        "PYTHONUNBUFFERED": "1",
    },
    restart=3,
    user="aigis-oracle",
    sandbox=True,
    own_dir=Path("/var/lib/aigis/ext/oracle"),
    hidden_dir=Path("/var/lib/aigis"),
    credentials={"AIGIS_AUTHKEY_FILE": "authkey"},
    connects_to=(Path("/run/aigis/aigis.sock"),),
)
#: An operator's choice: root, no sandbox; its directory outside the state directory.
PRIVILEGED = UnitSpec(
    name="boss",
    kind=Kind.EXTERNAL,
    argv=("/bin/sh", "/srv/boss/run.sh"),
    cwd=Path("/srv/boss"),
    user="root",
    sandbox=False,
    own_dir=Path("/srv/boss"),
    hidden_dir=None,
)
#: Its own account, sandboxed, its directory outside the state directory: only that is writable.
OUTSIDE = UnitSpec(
    name="clock",
    kind=Kind.EXTERNAL,
    argv=("/bin/sh", "/srv/my 100% clock/clock.sh"),
    cwd=Path("/srv/my 100% clock"),
    user="aigis-clock",
    sandbox=True,
    own_dir=Path("/srv/my 100% clock"),
    hidden_dir=None,
)


@pytest.mark.parametrize(
    ("spec", "version", "golden"),
    [
        (INTERNAL, 252, "internal-252.conf"),
        (INTERNAL, 254, "internal-254.conf"),
        (EXTERNAL, 252, "external-norestart.conf"),
        (SANDBOXED, 252, "internal-sandboxed.conf"),
        (PRIVILEGED, 252, "external-root-unsandboxed.conf"),
        (OUTSIDE, 252, "external-sandboxed-outside-state.conf"),
    ],
)
def test_dropins_match_golden_files(spec, version, golden):
    assert render_dropin(spec, version) == (GOLDEN / golden).read_text()


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("clock", "clock"),
        ("my-clock", "my\\x2dclock"),
        ("a.b_c", "a.b_c"),
        (".x", "\\x2ex"),
    ],
)
def test_escape_matches_systemd_escape(name, escaped):
    assert systemd_escape(name) == escaped
    assert unit_name(name) == f"aigis-plugin@{escaped}.service"
    assert plugin_of_unit(unit_name(name)) == name


def test_plugin_of_other_units_is_none():
    assert plugin_of_unit("aigis.service") is None


def test_environment_keeps_dollars_as_written():
    spec = UnitSpec(
        name="p",
        kind=Kind.EXTERNAL,
        argv=("/bin/true",),
        cwd=Path("/"),
        env={"B": "pa$word"},
        restart=None,
    )
    assert 'Environment="B=pa$word"' in render_dropin(spec).splitlines()


def test_quote_keeps_specifiers_and_variables_literal():
    assert quote('a "b" $X 5% \\') == '"a \\"b\\" $$X 5%% \\\\"'


def test_the_sandbox_has_what_the_issue_asks_for():
    settings = dict(line.split("=", 1) for line in SANDBOX if not line.startswith("SystemCall"))
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["CapabilityBoundingSet"] == ""  # empty: no capability at all
    assert settings["ProtectSystem"] == "strict"
    assert settings["ProtectHome"] == "read-only"
    assert settings["PrivateTmp"] == settings["RestrictSUIDSGID"] == "yes"
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups"):
        assert settings[key] == "yes"
    assert settings["ProtectClock"] == "yes"
    assert "SystemCallFilter=@system-service" in SANDBOX


def test_credentials_are_named_through_the_credentials_directory():
    lines = render_dropin(SANDBOXED).splitlines()
    assert 'Environment="AIGIS_AUTHKEY_FILE=%d/authkey"' in lines
    assert "LoadCredential=authkey:/var/lib/aigis/authkey" in lines
    assert not any("/var/lib/aigis/authkey" in line for line in lines if "Environment" in line)


def test_unsandboxed_plugins_get_no_sandbox_settings():
    lines = render_dropin(PRIVILEGED).splitlines()
    assert "User=root" in lines
    assert not set(SANDBOX) & set(lines)
    assert not any(line.startswith(("BindPaths=", "TemporaryFileSystem=")) for line in lines)


@pytest.mark.parametrize(
    ("plugin", "user"),
    [
        ("oracle", "aigis-oracle"),
        ("my-clock", "aigis-my-clock"),
        ("Big_One", "aigis-Big_One"),
        ("7up", "aigis-7up"),
        ("x" * 25, "aigis-" + "x" * 25),  # 31 characters: the longest sysusers accepts
        ("a.b", "aigis_a_b_2e7336dc"),  # no dots in user names
        ("x" * 26, "aigis_xxxxxxxxxxxxxxxx_18d2a9c4"),  # too long: a readable prefix + a hash
    ],
)
def test_plugin_user_names_are_valid_for_systemd_sysusers(plugin, user):
    name = plugin_user(plugin)
    assert name == user
    assert len(name) <= 31 and "." not in name and name[0].isalpha()


def test_plugin_user_names_of_two_forms_never_collide():
    # "a_b_<hash>" spelled out as a plugin name keeps the aigis- form; "a.b" takes aigis_.
    hashed = plugin_user("a.b")
    assert plugin_user(hashed.removeprefix("aigis_")) != hashed
    assert plugin_user("a.b") != plugin_user("a_b")
