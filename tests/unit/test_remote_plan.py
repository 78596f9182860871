"""Where a plugin runs and its process on a remote host (aigis._remote.plan, pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigis._config import parse_config
from aigis._errors import ConfigError, PluginError
from aigis._launch import process_spec
from aigis._manifest import Manifest
from aigis._remote.hosts import HostSpec
from aigis._remote.plan import (
    REMOTE_TEMPLATE,
    callback_line,
    core_address,
    core_forward,
    parse_show,
    placement,
    rebase,
    remote_spec,
    show_argv,
)
from aigis._states import State
from aigis._supervise.units import render_dropin
from aigis._supervise.unitstate import describe

CFG = Path("/etc/aigis/aigis.toml")
WEB1 = HostSpec("web1", "fd00::2", "root", 22, "/etc/aigis/id", "/usr/bin/python3")
HOSTS = {"web1": WEB1}


# -- placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "manifest_host", "expected"),
    [
        (None, "localhost", None),
        (None, "web1", WEB1),  # a name of [hosts]
        ("localhost", "web1", None),  # the operator brings it home
        ("web1", "localhost", WEB1),  # ... or sends it away
        (None, "::1", None),
        (None, "box-own-name", None),  # the core's own host name
    ],
)
def test_the_operator_override_wins_over_the_manifest(override, manifest_host, expected):
    assert placement("p", "internal", override, manifest_host, HOSTS, ["box-own-name"]) == expected


def test_a_host_outside_the_table_is_an_ssh_destination_with_defaults():
    host = placement("p", "external", None, "deploy@db2:2222", HOSTS)
    assert host == HostSpec("deploy@db2:2222", "db2", "deploy", 2222)


def test_a_core_plugin_elsewhere_is_refused_naming_the_source_of_the_host():
    with pytest.raises(PluginError) as e:
        placement("dnd", "core", None, "web1", HOSTS)
    assert str(e.value) == (
        'plugin "dnd": HOST in its manifest is "web1", but core plugins run inside the core, '
        "on its machine"
    )
    assert placement("dnd", "core", "localhost", "web1", HOSTS) is None


def test_a_bad_destination_names_where_it_came_from():
    with pytest.raises(PluginError, match=r"its host in aigis.toml: .*'-oProxyCommand=x'"):
        placement("p", "external", "-oProxyCommand=x", "localhost", HOSTS)


# -- the process on the host -------------------------------------------------------------------
def test_rebase_moves_only_paths_under_the_checkout():
    assert rebase("/s/ext/p", "/s/ext/p", "/var/lib/aigis/ext/p") == "/var/lib/aigis/ext/p"
    assert rebase("/s/ext/p/run.sh", "/s/ext/p/", "/r") == "/r/run.sh"
    assert rebase("/s/ext/pp/run.sh", "/s/ext/p", "/r") == "/s/ext/pp/run.sh"
    assert rebase("--flag", "/s/ext/p", "/r") == "--flag"


def settings(extra: str = 'tcp = "[fd00::1]:7878"'):
    return parse_config(f'[aigis]\nstate_dir = "/s"\n{extra}\n', CFG).settings


def test_an_internal_plugin_runs_the_runner_of_the_host_and_dials_the_core_over_tcp():
    manifest = Manifest("internal", Path("/s/ext/p/src"), launch="main")
    spec = process_spec("p", "/s/ext/p", manifest, settings())
    remote = remote_spec(
        spec, WEB1, tcp=("fd00::1", 7878), key_file=Path("/s/keys/p.key"),
        secrets=[("conf/token", Path("/etc/aigis/secrets/p/token"))],
        requirements=("pip install -r", "/s/ext/p/req.txt", "/s/ext/p/src", "abc"),
        tls_cert_file=Path("/s/tls/cert.pem"),
    )  # fmt: skip
    assert remote.argv == (
        "/usr/bin/python3", "-m", "aigis._runner", "--name", "p",
        "--entrypoint", "/var/lib/aigis/ext/p/src", "--launch", "main",
    )  # fmt: skip
    assert remote.cwd == Path("/var/lib/aigis/ext/p/src")
    assert remote.env["AIGIS_ADDRESS"] == "tcp:[fd00::1]:7878"
    assert remote.env["AIGIS_PLUGIN_DIR"] == "/var/lib/aigis/ext/p"
    assert remote.env["PYTHONPATH"] == "/var/lib/aigis/lib"
    assert remote.credentials == {
        "AIGIS_AUTHKEY_FILE": "authkey",
        "AIGIS_TLS_CERT_FILE": "tls-cert",
    }
    assert remote.env["AIGIS_TLS_CERT_FILE"] == "/var/lib/aigis/keys/core-cert.pem"
    assert remote.connects_to == () and remote.host == WEB1
    assert (remote.user, remote.own_dir) == ("aigis-p", Path("/var/lib/aigis/ext/p"))
    ship = remote.shipment
    assert ship is not None and ship.runtime
    assert (ship.source, ship.dest) == (Path("/s/ext/p"), "/var/lib/aigis/ext/p")
    assert ship.files == (
        ("/var/lib/aigis/keys/p.key", Path("/s/keys/p.key")),
        ("/var/lib/aigis/keys/core-cert.pem", Path("/s/tls/cert.pem")),
    )
    assert ship.secrets == (("conf/token", Path("/etc/aigis/secrets/p/token")),)
    assert ship.requirements == (
        "pip install -r", "/var/lib/aigis/ext/p/req.txt", "/var/lib/aigis/ext/p/src", "abc",
    )  # fmt: skip
    dropin = render_dropin(remote)
    assert "LoadCredential=authkey:/var/lib/aigis/keys/p.key" in dropin
    assert 'TemporaryFileSystem="/var/lib/aigis/ext:ro"' in dropin
    assert 'BindPaths="/var/lib/aigis/ext/p"' in dropin
    assert "/s/" not in dropin  # nothing of the core's machine leaks into the host's unit


def test_without_a_certificate_an_internal_plugin_dials_plain_tcp():
    manifest = Manifest("internal", Path("/s/ext/p"), launch="main")
    spec = process_spec("p", "/s/ext/p", manifest, settings())
    remote = remote_spec(spec, WEB1, tcp=("fd00::1", 7878), key_file=Path("/s/keys/p.key"))
    assert "AIGIS_TLS_CERT_FILE" not in remote.env
    assert remote.credentials == {"AIGIS_AUTHKEY_FILE": "authkey"}


def test_an_external_plugin_gets_neither_key_nor_runtime_and_absolute_argv():
    manifest = Manifest("external", Path("/s/ext/x/bin"), launch=("./run.sh", "/s/ext/x/conf"))
    spec = process_spec("x", "/s/ext/x", manifest, settings())
    remote = remote_spec(spec, WEB1, tcp=None, key_file=Path("/s/keys/x.key"))
    assert remote.argv == ("/var/lib/aigis/ext/x/bin/run.sh", "/var/lib/aigis/ext/x/conf")
    assert "AIGIS_ADDRESS" not in remote.env and "AIGIS_AUTHKEY_FILE" not in remote.env
    assert remote.credentials == {} and remote.shipment is not None
    assert not remote.shipment.runtime and remote.shipment.files == ()


@pytest.mark.parametrize(
    ("host", "tcp", "expected"),
    [
        (WEB1, ("fd00::1", 7878), "tcp:[fd00::1]:7878"),
        (WEB1, ("10.0.0.1", 7878), "tcp:10.0.0.1:7878"),
        (HostSpec("w", "w", core_address="core.lan:9000"), ("0.0.0.0", 7878), "tcp:core.lan:9000"),
        (HostSpec("w", "w", core_address="[fd00::9]:9000"), None, "tcp:[fd00::9]:9000"),
    ],
)
def test_the_core_address_a_host_dials(host, tcp, expected):
    assert core_address(host, tcp) == expected


@pytest.mark.parametrize(
    ("tcp", "message"),
    [
        (
            None,
            'internal plugins on host "web1" connect back to the core over TCP: set [aigis] tcp',
        ),
        (("0.0.0.0", 7878), '[aigis] tcp listens on "0.0.0.0:7878", which host "web1" cannot'),
        (("127.0.0.1", 7878), '[aigis] tcp listens on "127.0.0.1:7878", which host "web1"'),
    ],
)
def test_a_core_address_no_host_can_dial_says_what_to_set(tcp, message):
    with pytest.raises(ValueError) as e:
        core_address(WEB1, tcp)
    assert str(e.value).startswith(message)


def test_hosts_table_core_address_is_validated_with_its_key():
    with pytest.raises(ConfigError) as e:
        parse_config('[hosts]\nweb1 = { address = "w", core_address = "nope" }\n', CFG)
    assert e.value.problems == [
        f'{CFG}:2: [hosts] hosts.web1.core_address: expected "host:port", "[ipv6]:port", '
        '"ssh" or "ssh:PORT", got \'nope\''
    ]


@pytest.mark.parametrize("value", ["ssh:0", "ssh:70000", "ssh:", "ssh:x", "SSH", "ssh:[::1]:1"])
def test_a_bad_ssh_core_address_is_refused(value):
    with pytest.raises(ConfigError) as e:
        parse_config(f'[hosts]\nweb1 = {{ address = "w", core_address = "{value}" }}\n', CFG)
    assert "hosts.web1.core_address: expected" in e.value.problems[0]


@pytest.mark.parametrize(
    ("core", "tcp", "forward", "address"),
    [
        ("ssh", ("127.0.0.1", 7878), (7878, "127.0.0.1", 7878), "tcp:127.0.0.1:7878"),
        ("ssh:9100", ("fd00::1", 7878), (9100, "fd00::1", 7878), "tcp:127.0.0.1:9100"),
        ("ssh", ("0.0.0.0", 7878), (7878, "127.0.0.1", 7878), "tcp:127.0.0.1:7878"),
        ("ssh", ("::", 7000), (7000, "::1", 7000), "tcp:127.0.0.1:7000"),
        ("ssh", ("localhost", 7000), (7000, "127.0.0.1", 7000), "tcp:127.0.0.1:7000"),
    ],
)
def test_an_ssh_core_address_forwards_the_hosts_loopback_port_to_the_core(
    core, tcp, forward, address
):
    host = parse_config(f'[hosts]\nw = {{ address = "w", core_address = "{core}" }}\n', CFG)
    spec = host.hosts["w"]
    assert core_forward(spec, tcp) == forward
    assert core_address(spec, tcp) == address
    assert "through the ssh connection" in callback_line(spec, tcp)


def test_a_host_dialing_the_core_itself_has_no_forward():
    assert core_forward(WEB1, ("fd00::1", 7878)) is None
    assert core_forward(HostSpec("w", "w", core_address="[fd00::9]:9000"), None) is None
    assert callback_line(WEB1, ("fd00::1", 7878)) == (
        "internal plugins call back to [fd00::1]:7878"
    )


@pytest.mark.parametrize("tcp", [None, ("127.0.0.1", 0)])
def test_an_ssh_core_address_without_a_fixed_tcp_listener_says_what_to_set(tcp):
    host = HostSpec("web1", "w", core_address="ssh")
    with pytest.raises(ValueError) as e:
        core_address(host, tcp)
    assert str(e.value).startswith(
        'hosts.web1.core_address is "ssh", a forward to the core\'s TCP listener, but [aigis] '
        "tcp is "
    )
    assert str(e.value).endswith("set it to a fixed address and port (127.0.0.1:PORT is enough)")


# -- reading states ---------------------------------------------------------------------------
SHOW = """\
Id=aigis-plugin@a.service
LoadState=loaded
ActiveState=active
SubState=running
Result=success
Type=notify
Restart=no
NRestarts=0
StartLimitBurst=5
MainPID=4242
ExecMainStatus=0
ExecMainCode=0
ExecMainStartTimestamp=@1700000000
StateChangeTimestamp=@1700000001
Job=
NeedDaemonReload=no

Id=aigis-plugin@b.service
LoadState=loaded
ActiveState=failed
SubState=failed
Result=exit-code
Type=exec
Restart=on-failure
NRestarts=3
StartLimitBurst=3
MainPID=0
ExecMainStatus=3
ExecMainCode=1
ExecMainStartTimestamp=@1700000002
StateChangeTimestamp=@1700000003
Job=
NeedDaemonReload=yes
"""


def test_one_systemctl_show_gives_every_unit_state_in_order():
    units = ["aigis-plugin@b.service", "aigis-plugin@gone.service", "aigis-plugin@a.service"]
    b, gone, a = parse_show(SHOW, units)
    assert (a.active_state, a.main_pid, a.exec_main_start, a.state_change) == (
        "active", 4242, 1700000000.0, 1700000001.0,
    )  # fmt: skip
    assert describe(a, restart_limit=None, stop_requested=False).state is State.RUNNING
    view = describe(b, restart_limit=2, stop_requested=False)
    assert (view.state, view.restarts, view.reason) == (
        State.FAILED, 2, "gave up after 2 restarts (last: exit 3)",
    )  # fmt: skip
    assert b.need_reload and not a.need_reload
    assert (gone.load_state, gone.active_state) == ("not-found", "inactive")
    assert show_argv(units)[-4:] == ["--", *units]


def test_the_installed_template_keeps_the_packaged_service_lines():
    packaged = Path(__file__).parents[2] / "packaging" / "systemd" / "aigis-plugin@.service"
    wanted = [
        line
        for line in packaged.read_text().split("[Service]")[1].splitlines()
        if line and not line.startswith("#")
    ]
    ours = [line for line in REMOTE_TEMPLATE.split("[Service]")[1].splitlines() if line]
    assert ours == wanted
