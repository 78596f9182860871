"""Plugin files are read only as bounded regular files inside the plugin directory.

Each case used to hang ``aigisctl check`` and the root core (a FIFO), or read until memory
ran out (a link to /dev/zero), or read a file the plugin does not own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aigis._coreplugin import import_core
from aigis._ctl import main
from aigis._errors import SkillError
from aigis._plugindir import read_plugin_file, validate_plugin

GOOD = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'


def check_errors(capsys, tmp_path: Path, name: str = "p") -> list[str]:
    config = tmp_path / "aigis.toml"
    config.write_text(f'[aigis]\nstate_dir = "state"\n[core]\n{name} = "src/{name}"\n')
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return [line for line in out.err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def plugin(make_plugin) -> Path:
    return make_plugin("p", GOOD, core="SKILLS = []\n")


def test_manifest_linked_to_dev_zero_is_refused(plugin, tmp_path, capsys):
    manifest = plugin / "AIGIS" / "AIGIS.config"
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    assert check_errors(capsys, tmp_path) == [
        f'error: plugin "p": {manifest}: leads to /dev/zero, outside the plugin directory'
    ]


def test_core_file_linked_to_dev_zero_is_refused(plugin, tmp_path, capsys):
    core = plugin / "AIGIS" / "AIGIS.core"
    core.unlink()
    core.symlink_to("/dev/zero")
    assert check_errors(capsys, tmp_path) == [
        f'error: plugin "p": {core}: leads to /dev/zero, outside the plugin directory'
    ]


def test_manifest_linked_outside_the_plugin_is_refused(plugin, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.config"
    elsewhere.write_text(GOOD)
    manifest = plugin / "AIGIS" / "AIGIS.config"
    manifest.unlink()
    manifest.symlink_to(elsewhere)
    assert check_errors(capsys, tmp_path) == [
        f'error: plugin "p": {manifest}: leads to {elsewhere}, outside the plugin directory'
    ]


def test_fifo_manifest_is_refused_without_blocking(plugin, tmp_path, capsys):
    manifest = plugin / "AIGIS" / "AIGIS.config"
    manifest.unlink()
    os.mkfifo(manifest)
    assert check_errors(capsys, tmp_path) == [
        f'error: plugin "p": {manifest}: is a FIFO, not a regular file'
    ]


def test_oversized_core_file_is_refused(plugin, tmp_path, capsys):
    core = plugin / "AIGIS" / "AIGIS.core"
    core.write_text("SKILLS = []\n" + "#" * (1024 * 1024) + "\n")
    assert check_errors(capsys, tmp_path) == [
        f'error: plugin "p": {core}: larger than 1 MiB, the limit for this file'
    ]


def test_links_inside_the_plugin_are_followed(make_plugin):
    root = make_plugin("p", GOOD, core="SKILLS = []\n", files={"real/AIGIS.config": GOOD})
    (root / "AIGIS" / "AIGIS.config").unlink()
    (root / "AIGIS" / "AIGIS.config").symlink_to("../real/AIGIS.config")
    checked = validate_plugin(root, "p", "core")
    assert (checked.errors, checked.warnings) == ([], [])
    assert checked.manifest is not None and checked.manifest.plugin_type == "core"


def test_missing_and_dangling_files_read_as_absent(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert read_plugin_file(tmp_path, Path("absent")) is None
    assert read_plugin_file(tmp_path, Path("dangling")) is None


def test_binary_manifest_is_an_error_naming_the_byte(plugin, tmp_path, capsys):
    manifest = plugin / "AIGIS" / "AIGIS.config"
    manifest.write_bytes(b"PLUGIN_TYPE = '\xff'\n")
    assert check_errors(capsys, tmp_path) == [
        f'error: plugin "p": {manifest}: not UTF-8 text (invalid start byte at byte 15)'
    ]


def test_import_core_reads_the_core_file_bounded_too(plugin):
    core = plugin / "AIGIS" / "AIGIS.core"
    core.unlink()
    core.symlink_to("/dev/zero")
    with pytest.raises(SkillError) as info:
        import_core("p", core, plugin)
    assert info.value.reason == f"{core}: leads to /dev/zero, outside the plugin directory"
