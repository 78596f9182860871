"""Unit names and drop-ins: pure rendering compared with golden files."""

from pathlib import Path

import pytest

from aigis._states import Kind
from aigis._supervise.base import ProcessSpec as UnitSpec
from aigis._supervise.units import (
    plugin_of_unit,
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


@pytest.mark.parametrize(
    ("spec", "version", "golden"),
    [
        (INTERNAL, 252, "internal-252.conf"),
        (INTERNAL, 254, "internal-254.conf"),
        (EXTERNAL, 252, "external-norestart.conf"),
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
