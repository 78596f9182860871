"""Config parsing and validation (SPEC §1)."""

import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from aigis._config import ConfigError, Settings, load_config, parse_config
from aigis._settings import BY_NAME, SETTINGS

CFG = Path("/etc/aigis/aigis.toml")
ETC_PATH = CFG


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, CFG)
    return info.value.problems


def test_tables_set_load_order_core_internal_external_and_file_order():
    config = parse_config(
        '[external]\nz = "/z"\n[core]\nb = "/b"\na = "/a"\n[internal]\ni = "/i"\n', CFG
    )
    assert [(p.table, p.name) for p in config.plugins] == [
        ("core", "b"),
        ("core", "a"),
        ("internal", "i"),
        ("external", "z"),
    ]


def test_missing_tables_mean_empty_and_defaults_apply():
    config = parse_config("", CFG)
    assert config.plugins == ()
    s = config.settings
    assert s.secrets_dir == Path("/etc/aigis/secrets")
    assert s.tcp is None
    assert s.supervisor == "auto" and s.requirements == "run" and s.restart_delay == 1.0
    assert s.socket == s.runtime_dir / "aigis.sock"
    assert s.plugins_dir == s.state_dir / "ext"


def test_inline_table_with_ref():
    config = parse_config('[core]\nx = { source = "https://h/x.git", ref = "v1.2" }\n', CFG)
    assert config.plugins[0].source == "https://h/x.git"
    assert config.plugins[0].ref == "v1.2"


def test_relative_settings_resolve_against_config_dir():
    config = parse_config(
        '[aigis]\nstate_dir = "st"\ntcp = "127.0.0.1:7878"\n', Path("/srv/a/aigis.toml")
    )
    assert config.settings.state_dir == Path("/srv/a/st")
    assert config.settings.tcp == ("127.0.0.1", 7878)


def test_ipv6_tcp_address():
    config = parse_config('[aigis]\ntcp = "[::1]:0"\n', CFG)
    assert config.settings.tcp == ("::1", 0)


def test_toml_syntax_error_names_file_and_line():
    (line,) = problems('[core]\nx = "unterminated\n')
    assert line.startswith("/etc/aigis/aigis.toml:2: TOML syntax error: ")
    assert line.endswith("(column 18)")


def test_duplicate_name_in_one_table_names_plugin_and_both_lines():
    (line,) = problems('[core]\nx = "/a"\ny = "/b"\nx = "/c"\n')
    assert line == '/etc/aigis/aigis.toml:4: [core] duplicate plugin name "x" (first at line 2)'


def test_duplicate_name_across_tables():
    (line,) = problems('[core]\nx = "/a"\n[external]\nx = "/b"\n')
    assert line == (
        '/etc/aigis/aigis.toml:4: [external] duplicate plugin name "x" (already listed in [core])'
    )


def test_invalid_name():
    (line,) = problems('[core]\n"bad name" = "/a"\n')
    assert line.startswith('/etc/aigis/aigis.toml:2: [core] invalid plugin name "bad name"')


def test_aigis_is_reserved_for_the_builtins():
    (line,) = problems('[core]\naigis = "/a"\n')
    assert line == (
        '/etc/aigis/aigis.toml:2: [core] plugin name "aigis" is reserved for '
        "AIGIS's built-in skills; choose another name"
    )


def test_name_longer_than_64_is_invalid():
    assert "invalid plugin name" in problems(f'[core]\n{"a" * 65} = "/a"\n')[0]


def test_every_problem_reported_at_once():
    lines = problems(
        '[core]\n"-x" = "/a"\ny = 3\n[aigis]\nsupervisor = "runit"\nfoo = 1\n[plugins]\n'
    )
    assert len(lines) == 5
    assert any("[aigis] supervisor must be one of auto, systemd, embedded" in x for x in lines)
    assert any('unknown setting "foo"' in x for x in lines)
    assert any('unknown table or key "plugins"' in x for x in lines)
    assert any('plugin "y": expected a source string' in x for x in lines)


def test_wrong_setting_type_says_expected():
    (line,) = problems('[aigis]\nrestart_delay = "1s"\n')
    assert line == (
        "/etc/aigis/aigis.toml:2: [aigis] restart_delay must be a number of "
        "seconds >= 0 and <= 604800, got str '1s'"
    )


def test_unknown_inline_key_and_bad_ref():
    lines = problems(
        '[core]\nx = { source = "/a", branch = "m" }\ny = { source = "/b", ref = 1 }\n'
    )
    assert "unknown key(s) branch" in lines[0]
    assert '"ref" must be a non-empty string' in lines[1]


def test_bad_tcp_address():
    assert 'tcp must be "host:port"' in problems('[aigis]\ntcp = "7878"\n')[0]


def test_a_config_under_etc_uses_system_paths_for_any_user(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    for var in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    settings = parse_config("", Path("/etc/aigis/aigis.toml")).settings
    assert (settings.state_dir, settings.runtime_dir) == (
        Path("/var/lib/aigis"),
        Path("/run/aigis"),
    )
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    settings = parse_config("", Path("/home/u/aigis.toml")).settings
    assert (settings.state_dir, settings.runtime_dir) == (
        Path("/home/u/.state/aigis"),
        Path("/run/user/1000/aigis"),
    )


# --- one table of settings -------------------------------------------------------------------

ETC = Path(__file__).parents[2] / "etc" / "aigis" / "aigis.toml"


def etc_settings_text() -> str:
    """The packaged file's [aigis] table with every commented ``# key = value`` line enabled."""
    lines, in_aigis = ["[aigis]"], False
    for line in ETC.read_text().splitlines():
        if line.startswith("["):
            in_aigis = line.strip() == "[aigis]"
            continue
        match = re.match(r"#?\s*([a-z_]+)\s*=\s*(.*)$", line)
        if in_aigis and match and match.group(1) in BY_NAME:
            value = re.sub(r"\s+#.*$", "", match.group(2))
            lines.append(f"{match.group(1)} = {value}")
    return "\n".join(lines) + "\n"


def test_packaged_config_lists_every_setting_with_its_real_default(monkeypatch):
    for var in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    listed = tomllib.loads(etc_settings_text())["aigis"]
    assert list(listed) == [s.name for s in SETTINGS]  # every one, in the table's order
    for setting in SETTINGS:
        if setting.default is not None:
            assert listed[setting.name] == setting.default, setting.name
    # Computed defaults too: enabling every line changes nothing for the packaged path.
    enabled = parse_config(etc_settings_text(), ETC_PATH).settings
    assert enabled == parse_config("", ETC_PATH).settings


def test_settings_dataclass_defaults_come_from_the_table():
    for item in fields(Settings):
        if item.default is not MISSING:
            declared = BY_NAME[item.name].default
            if declared == "" and BY_NAME[item.name].kind in ("address", "optional_path"):
                declared = None  # a disabled listener, no file: stored as None
            assert item.default == declared, item.name
    assert parse_config("", CFG).settings.log_backups == 3


def test_every_declared_default_passes_its_own_validation():
    for setting in SETTINGS:
        if setting.default is not None:
            assert setting.valid(setting.default), setting.name


# --- hardening: values that used to pass and then hang or crash the daemon -------------------


@pytest.mark.parametrize("key", ["stop_timeout", "restart_delay", "restart_delay_max"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinite_seconds_are_rejected(key, value):
    (line,) = problems(f"[aigis]\n{key} = {value}\n")
    assert line.startswith(f"/etc/aigis/aigis.toml:2: [aigis] {key} must be a number of seconds")
    assert line.endswith(f"got float {value}")


def test_nan_requirements_timeout_is_rejected():
    (line,) = problems("[aigis]\nrequirements_timeout = nan\n")
    assert line == (
        "/etc/aigis/aigis.toml:2: [aigis] requirements_timeout must be a number of "
        "seconds > 0 and <= 604800, got float nan"
    )


def test_absurdly_long_delay_is_rejected():
    assert "<= 604800, got float 1e+300" in problems("[aigis]\nstop_timeout = 1e300\n")[0]


@pytest.mark.parametrize(
    "key", ["state_dir", "secrets_dir", "runtime_dir", "socket", "authkey_file"]
)
def test_nul_in_a_path_setting_is_rejected(key):
    (line,) = problems(f'[aigis]\n{key} = "/run/a\\u0000b"\n')
    assert line == (
        f"/etc/aigis/aigis.toml:2: [aigis] {key} must be a path (a non-empty string "
        "without NUL), got str '/run/a\\x00b'"
    )


def test_nul_in_a_plugin_source_is_rejected():
    (line,) = problems('[core]\nx = "/srv/a\\u0000b"\n')
    assert line == '/etc/aigis/aigis.toml:2: [core] plugin "x": source contains a NUL byte'


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000 + "]" * 100_000,
        "a = " + "{b=" * 10_000 + "1" + "}" * 10_000,
    ],
)
def test_deeply_nested_toml_is_one_line_naming_the_file(text):
    assert problems(text) == [
        "/etc/aigis/aigis.toml: TOML too deeply nested or too large (RecursionError)"
    ]


def test_control_characters_in_keys_are_escaped():
    lines = problems('[aigis]\n"evil\\u001b[2J\\n" = 1\n[core]\n"\\u001b]0;x\\u0007" = "/a"\n')
    assert lines[0].startswith("/etc/aigis/aigis.toml:4: [core] invalid plugin name ")
    assert '"\\x1b]0;x\\x07"' in lines[0]
    assert lines[1].startswith(
        '/etc/aigis/aigis.toml:2: [aigis] unknown setting "evil\\x1b[2J\\n"; known: state_dir'
    )
    assert all(line.isprintable() for line in lines)


def test_long_values_are_cut_in_messages():
    lines = problems(f'[aigis]\nsupervisor = "{"x" * 10_000_000}"\n[core]\n"{"y" * 50_000}" = 1\n')
    assert len(lines) == 3
    assert all(len(line) < 400 for line in lines), [len(line) for line in lines]
    assert "supervisor must be one of auto, systemd, embedded, got str 'xxx" in lines[2]


def test_huge_port_number_is_an_error_not_a_crash():
    assert 'tcp must be "host:port"' in problems(f'[aigis]\ntcp = "h:{"9" * 5000}"\n')[0]


def test_config_file_that_is_a_device_or_too_big_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert info.value.problems == ["/dev/zero: config file is not a regular file"]
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(big)
    assert info.value.problems == [f"{big}: config file is larger than 1048576 bytes"]


def test_the_http_listener_is_off_by_default_and_loopback_needs_no_token():
    settings = parse_config("", CFG).settings
    assert (settings.http, settings.http_token_file) == (None, None)
    settings = parse_config('[aigis]\nhttp = "127.0.0.1:9120"\n', CFG).settings
    assert (settings.http, settings.http_token_file) == (("127.0.0.1", 9120), None)
    for host in ("localhost", "[::1]", "127.0.0.2"):
        assert parse_config(f'[aigis]\nhttp = "{host}:1"\n', CFG).settings.http[1] == 1


def test_a_non_loopback_http_listener_needs_a_token_file():
    for host in ("0.0.0.0", "192.0.2.1", "[::]", "example.org"):
        with pytest.raises(ConfigError) as caught:
            parse_config(f'[aigis]\nhttp = "{host}:9120"\n', CFG)
        assert caught.value.problems == [
            f'/etc/aigis/aigis.toml:2: [aigis] http "{host}:9120" is not a loopback address: '
            "set http_token_file too (a file with the bearer token every request must carry)"
        ]
    settings = parse_config(
        '[aigis]\nhttp = "0.0.0.0:9120"\nhttp_token_file = "http.token"\n', CFG
    ).settings
    assert settings.http_token_file == Path("/etc/aigis/http.token")


def test_a_bad_http_address_names_the_key():
    with pytest.raises(ConfigError) as caught:
        parse_config('[aigis]\nhttp = "9120"\n', CFG)
    assert caught.value.problems == [
        '/etc/aigis/aigis.toml:2: [aigis] http must be "host:port" (e.g. "127.0.0.1:7878"), '
        "got '9120'"
    ]


def test_hosts_table_and_a_plugin_host_override():
    config = parse_config(
        "[hosts]\n"
        'web1 = { address = "fd00::2", user = "deploy", port = 2222, python = "/usr/bin/py3" }\n'
        '[external]\nx = { source = "/x", host = "web1" }\ny = "/y"\n',
        CFG,
    )
    web1 = config.hosts["web1"]
    assert (web1.address, web1.user, web1.port, web1.python) == (
        "fd00::2", "deploy", 2222, "/usr/bin/py3",
    )  # fmt: skip
    assert [p.host for p in config.plugins] == ["web1", None]


def test_hosts_problems_name_the_file_line_and_key():
    assert problems('[hosts]\nweb1 = { address = "w", port = "22" }\n') == [
        f"{CFG}:2: [hosts] hosts.web1.port: port must be an integer 1-65535, got '22'"
    ]
    assert problems('[external]\nx = { source = "/x", host = 3 }\n') == [
        f'{CFG}:2: [external] plugin "x": "host" must be a host of [hosts], an ssh destination '
        'or "localhost", got 3'
    ]


def test_remote_settings_defaults_and_paths():
    s = parse_config("", CFG).settings
    assert (s.connect_timeout, s.known_hosts, s.ssh_config) == (5.0, None, None)
    s = parse_config('[aigis]\nknown_hosts = "kh"\nconnect_timeout = 2\n', CFG).settings
    assert (s.known_hosts, s.connect_timeout) == (Path("/etc/aigis/kh"), 2.0)


def test_plugin_user_defaults_to_the_packaged_account_and_must_be_a_user_name():
    assert parse_config("", CFG).settings.plugin_user == "aigis-plugin"
    assert parse_config('[aigis]\nplugin_user = "bots"\n', CFG).settings.plugin_user == "bots"
    for bad in ('"bad name"', '"9lives"', '""', "1", '"' + "x" * 33 + '"'):
        (problem,) = problems(f"[aigis]\nplugin_user = {bad}\n")
        assert 'plugin_user must be a user name such as "aigis-plugin", got ' in problem, bad
