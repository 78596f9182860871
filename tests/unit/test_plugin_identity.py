"""Per-plugin identity: aigis.toml's ``user``/``sandbox``, the launch spec they give, the
account's files (handed over without following symlinks), socket ACLs and secrets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aigis._config import ConfigError, parse_config
from aigis._errors import PluginError, SecretsError
from aigis._launch import process_spec
from aigis._manifest import Manifest
from aigis._reload import diff
from aigis._secrets import copy_secrets
from aigis._states import Kind
from aigis._supervise.base import ProcessSpec
from aigis._supervise.identity import (
    GROUP_OBJ,
    MASK,
    OTHER,
    UNDEFINED_ID,
    USER,
    USER_OBJ,
    acl_from_mode,
    decode_acl,
    encode_acl,
    ensure_user,
    hand_over,
    sysusers_line,
    with_user,
)

CFG = Path("/etc/aigis/aigis.toml")
SETTINGS = '[aigis]\nstate_dir = "/var/lib/aigis"\nruntime_dir = "/run/aigis"\n'
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def config(plugins: str):
    return parse_config(SETTINGS + plugins, CFG)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(text)
    return info.value.problems


# -- aigis.toml ---------------------------------------------------------------------------------
def test_plugins_run_as_their_own_account_sandboxed_unless_the_operator_says_otherwise():
    plugins = config(
        '[internal]\na = "/a"\nb = { source = "/b", user = "root", sandbox = false }\n'
    ).plugins
    assert (plugins[0].user, plugins[0].sandbox) == (None, True)
    assert (plugins[1].user, plugins[1].sandbox) == ("root", False)


def test_bad_user_and_sandbox_values_name_the_plugin_and_line():
    lines = problems(
        '[external]\nx = { source = "/x", user = "no body" }\n'
        'y = { source = "/y", sandbox = "no" }\n'
    )
    assert lines == [
        '/etc/aigis/aigis.toml:5: [external] plugin "x": "user" must be a user name such as '
        "\"root\", got 'no body'",
        '/etc/aigis/aigis.toml:6: [external] plugin "y": "sandbox" must be true or false, '
        "got 'no'",
    ]


def test_changing_a_plugins_user_or_sandbox_reloads_it():
    old = config('[external]\na = "/a"\nb = "/b"\nc = "/c"\n')
    new = config(
        '[external]\na = { source = "/a", user = "root" }\nb = { source = "/b", sandbox = false }'
        '\nc = "/c"\n'
    )
    plan = diff(old, new)
    assert [e.name for e in plan.changed] == ["a", "b"] and plan.unchanged == ("c",)


# -- the launch spec -----------------------------------------------------------------------------
def test_the_launch_spec_of_a_default_internal_plugin():
    settings = config("").settings
    manifest = Manifest("internal", Path("/var/lib/aigis/ext/o/src"), "main")
    spec = process_spec("o", "/var/lib/aigis/ext/o", manifest, settings)
    assert spec.user == "aigis-o" and spec.sandbox
    assert spec.own_dir == Path("/var/lib/aigis/ext/o")  # its checkout, not only ENTRYPOINT
    assert spec.hidden_dir == Path("/var/lib/aigis")
    assert spec.credentials == {"AIGIS_AUTHKEY_FILE": "authkey"}
    assert spec.env["AIGIS_AUTHKEY_FILE"] == "/var/lib/aigis/keys/o.key"  # its own key
    assert spec.connects_to == (Path("/run/aigis/aigis.sock"),)


def test_external_plugins_get_neither_the_authkey_nor_the_socket():
    settings = config("").settings
    manifest = Manifest("external", Path("/srv/c"), ("/bin/true",))
    spec = process_spec("c", "/srv/c", manifest, settings, user="root", sandbox=False)
    assert (spec.user, spec.sandbox, spec.hidden_dir) == ("root", False, None)
    assert spec.credentials == {} and spec.connects_to == ()


def test_a_credential_must_name_a_variable_of_the_environment():
    with pytest.raises(ValueError, match='plugin "p": credential KEY is not in env'):
        ProcessSpec("p", Kind.EXTERNAL, ("/bin/true",), Path("/"), credentials={"KEY": "k"})


def test_sysusers_line_of_the_own_account():
    spec = ProcessSpec(
        "my clock", Kind.EXTERNAL, ("/bin/true",), Path("/"), user="aigis_x", own_dir=Path("/s x")
    )
    assert sysusers_line(spec) == 'u aigis_x - "AIGIS plugin my clock" "/s x" -\n'


def test_an_account_the_operator_names_must_exist(tmp_path):
    spec = ProcessSpec(
        "p", Kind.EXTERNAL, ("/bin/true",), Path("/"), user="no-such-user-xyz", own_dir=tmp_path
    )
    with pytest.raises(PluginError, match='user "no-such-user-xyz" .aigis.toml. does not exist'):
        ensure_user(spec, root=tmp_path)
    assert not (tmp_path / "run").exists()  # nothing created for it


# -- ACLs ----------------------------------------------------------------------------------------
def test_a_user_entry_and_mask_are_added_to_a_minimal_acl():
    entries = with_user(acl_from_mode(0o750), 994, 0o1)
    assert entries == [
        (USER_OBJ, 0o7, UNDEFINED_ID),
        (USER, 0o1, 994),
        (GROUP_OBJ, 0o5, UNDEFINED_ID),
        (MASK, 0o5, UNDEFINED_ID),  # the group's r-x kept: the mask is now the group bits
        (OTHER, 0o0, UNDEFINED_ID),
    ]
    assert decode_acl(encode_acl(entries)) == entries


def test_adding_a_second_user_keeps_the_first_and_sorts_by_id():
    first = with_user(acl_from_mode(0o660), 995, 0o6)
    both = with_user(first, 993, 0o6)
    assert [(tag, ident) for tag, _, ident in both if tag == USER] == [(USER, 993), (USER, 995)]
    assert with_user(both, 993, 0o6) == both  # idempotent


def test_acl_xattr_layout_matches_the_kernels():
    value = encode_acl([(USER_OBJ, 6, UNDEFINED_ID), (GROUP_OBJ, 4, UNDEFINED_ID)])
    assert value == bytes.fromhex("0200000001000600ffffffff04000400ffffffff")


# -- handing the checkout over ------------------------------------------------------------------
@root_only
def test_hand_over_gives_the_tree_but_never_follows_symlinks(tmp_path):
    own = tmp_path / "ext" / "p"
    (own / "AIGIS").mkdir(parents=True)
    (own / "AIGIS" / "AIGIS.config").write_text("PLUGIN_TYPE = 'external'\n")
    (own / ".git").mkdir()
    (own / "lib").mkdir()
    (own / "lib" / "code.py").write_text("")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("root's\n")
    (own / "link-to-file").symlink_to(outside / "victim")
    (own / "link-to-dir").symlink_to(outside)
    os.link(outside / "victim", own / "hardlink")
    changed = hand_over("p", own, 4242, 4343)
    assert changed == 4  # lib, lib/code.py and the two symlinks themselves
    top = own.stat()
    assert (top.st_uid, top.st_gid, stat.S_IMODE(top.st_mode)) == (0, 4343, 0o1770)
    for path in (own / "lib", own / "lib" / "code.py"):
        assert (path.stat().st_uid, path.stat().st_gid) == (4242, 4343)
    assert os.lstat(own / "link-to-file").st_uid == 4242
    for kept in (outside, outside / "victim", own / "AIGIS", own / "AIGIS" / "AIGIS.config"):
        assert kept.stat().st_uid == 0, kept
    assert (own / ".git").stat().st_uid == 0
    assert hand_over("p", own, 4242, 4343) == 0  # nothing left to change


# -- secrets -------------------------------------------------------------------------------------
def _secret_setup(tmp_path: Path) -> tuple[Path, Path]:
    secrets = tmp_path / "secrets"
    (secrets / "p").mkdir(parents=True)
    (secrets / "p" / "k.secret").write_text("hush\n")
    root = tmp_path / "ext" / "p"
    (root / "AIGIS").mkdir(parents=True)
    (root / "AIGIS" / "AIGIS.config").write_text("manifest\n")
    return secrets, root


def test_a_planted_symlink_at_a_secrets_destination_is_replaced_not_written_through(tmp_path):
    secrets, root = _secret_setup(tmp_path)
    (root / "etc").mkdir()
    (root / "etc" / "k.secret").symlink_to(root / "AIGIS" / "AIGIS.config")
    assert copy_secrets("p", {"k.secret": f"{root}/etc/"}, secrets, root) == 1
    assert (root / "AIGIS" / "AIGIS.config").read_text() == "manifest\n"
    written = root / "etc" / "k.secret"
    assert not written.is_symlink() and written.read_text() == "hush\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o400


def test_a_planted_directory_symlink_on_the_way_to_a_secret_is_refused(tmp_path):
    secrets, root = _secret_setup(tmp_path)
    (root / "etc").symlink_to(root / "AIGIS")
    with pytest.raises(SecretsError, match="cannot copy secret"):
        copy_secrets("p", {"k.secret": "etc/k.secret"}, secrets, root)
    assert sorted(p.name for p in (root / "AIGIS").iterdir()) == ["AIGIS.config"]
