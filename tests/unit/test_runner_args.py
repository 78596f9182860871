"""The plugin runner's command line: the form AIGIS writes is read as is, others by argparse."""

from __future__ import annotations

import pytest

from aigis import _runner
from aigis._launch import runner_argv
from aigis._manifest import parse_manifest


def options(argv: list[str]) -> tuple[str, str, str]:
    got = _runner.parse_args(argv)
    return got.name, got.entrypoint, got.launch


def test_the_argv_aigis_writes_is_read_without_argparse(monkeypatch, tmp_path):
    manifest = parse_manifest(
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "main"\n',
        str(tmp_path / "AIGIS" / "AIGIS.config"),
        root=tmp_path,
        plugin="oracle",
    )
    argv = list(runner_argv("oracle", manifest)[3:])  # after python -m aigis._runner

    def refuse(argv: list[str]) -> None:
        raise AssertionError("argparse was used")

    monkeypatch.setattr(_runner, "_parse_with_argparse", refuse)
    assert options(argv) == ("oracle", str(tmp_path), "main")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--launch", "m", "--name", "n", "--entrypoint", "/d"], ("n", "/d", "m")),
        (["--name=n", "--entrypoint=/d", "--launch=m"], ("n", "/d", "m")),
    ],
)
def test_other_spellings_still_parse(argv, expected):
    assert options(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [["--name", "n", "--entrypoint", "/d"], ["--name", "--entrypoint", "/d", "--launch", "m", "x"]],
)
def test_mistakes_get_argparse_s_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        _runner.parse_args(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("usage: python -m aigis._runner ")
