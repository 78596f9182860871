"""Host specs: the [hosts] table and a plugin's HOST value (aigis._remote.hosts)."""

from __future__ import annotations

import pytest

from aigis._errors import ConfigError
from aigis._remote.hosts import (
    HostSpec,
    hosts_from_table,
    is_local,
    parse_destination,
    resolve_host,
)


@pytest.mark.parametrize(
    ("value", "address", "user", "port"),
    [
        ("web1", "web1", None, 22),
        ("web1.example.org", "web1.example.org", None, 22),
        ("deploy@web1", "web1", "deploy", 22),
        ("web1:2222", "web1", None, 2222),
        ("deploy@web1:2222", "web1", "deploy", 2222),
        ("10.0.0.7:22", "10.0.0.7", None, 22),
        ("fd00::2", "fd00::2", None, 22),
        ("[fd00::2]", "fd00::2", None, 22),
        ("[fd00::2]:2200", "fd00::2", None, 2200),
        ("root@[fd00:a16:1::2]:22", "fd00:a16:1::2", "root", 22),
        ("ssh://deploy@web1:2222", "web1", "deploy", 2222),
        ("ssh://[fd00::2]:2200/", "fd00::2", None, 2200),
    ],
)
def test_destinations_parse(value, address, user, port):
    spec = parse_destination(value)
    assert (spec.address, spec.user, spec.port, spec.name) == (address, user, port, value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-oProxyCommand=evil", "not a host name or IP address: '-oProxyCommand=evil'"),
        ("web1;reboot", "not a host name or IP address: 'web1;reboot'"),
        ("web 1", "not a host name or IP address: 'web 1'"),
        ("web1:ssh", "bad port in 'web1:ssh'"),
        ("web1:0", "port must be an integer 1-65535, got 0"),
        ("web1:70000", "port must be an integer 1-65535, got 70000"),
        ("-x@web1", "bad user in '-x@web1'"),
        ("[fd00::2", "bad bracketed address in '[fd00::2'"),
        ("[fd00::2]x", "bad bracketed address in '[fd00::2]x'"),
        ("", "not a host name or IP address: ''"),
        ("a..b", "not a host name or IP address: 'a..b'"),
    ],
)
def test_bad_destinations_say_what_is_wrong_and_what_is_expected(value, problem):
    with pytest.raises(ValueError) as e:
        parse_destination(value)
    assert problem in str(e.value)
    assert "expected host, user@host, host:port" in str(e.value)


def test_destination_puts_user_before_a_bare_ipv6_address():
    assert parse_destination("root@[fd00::2]:2200").destination == "root@fd00::2"
    assert parse_destination("fd00::2").destination == "fd00::2"


def test_hosts_table():
    hosts = hosts_from_table(
        {
            "web1": {"address": "fd00::2", "user": "deploy", "port": 2222,
                     "identity_file": "/etc/aigis/id_web1", "python": "/usr/bin/python3.11"},
            "web2": "root@web2.lan:22",
            "web3": {"address": "deploy@web3:2200", "port": 2201},
        }
    )  # fmt: skip
    assert hosts["web1"] == HostSpec(
        "web1", "fd00::2", "deploy", 2222, "/etc/aigis/id_web1", "/usr/bin/python3.11"
    )
    assert hosts["web2"] == HostSpec("web2", "web2.lan", "root", 22)
    assert hosts["web3"] == HostSpec("web3", "web3", "deploy", 2201)  # the key wins


def test_hosts_table_lists_every_problem_by_key():
    with pytest.raises(ConfigError) as e:
        hosts_from_table(
            {
                "web1": {"address": "fd00::2", "port": "22", "colour": "red"},
                "web2": {"user": "x"},
                "web3": {"address": "web3", "identity_file": "id_rsa", "python": "py; rm"},
                "bad name": "x",
                "web4": 7,
            }
        )
    assert e.value.problems == [
        "hosts.web1: unknown keys ['colour']; known: ['address', 'core_address', 'identity_file', "
        "'port', 'python', 'user']",
        "hosts.web1.port: port must be an integer 1-65535, got '22'",
        "hosts.web2.address: required, a host name or IP address",
        "hosts.web3.identity_file: must be an absolute path, got 'id_rsa'",
        "hosts.web3.python: an interpreter name or absolute path, got 'py; rm'",
        "hosts.bad name: a host name is letters, digits, '_', '.', '-' (max 64)",
        "hosts.web4: expected a table or a destination string, got 7",
    ]


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ("localhost", True),
        ("", True),
        ("127.0.0.1", True),
        ("127.0.0.5", True),
        ("::1", True),
        ("[::1]:22", True),
        ("root@localhost", True),
        ("core1", True),  # the core's own host name
        ("CORE1", True),
        ("web1", False),
        ("fd00::2", False),
        ("-bad", False),
    ],
)
def test_local_means_this_machine(value, local):
    assert is_local(value, own_names=["core1"]) is local


def test_resolve_host_prefers_the_hosts_table():
    table = {"web1": HostSpec("web1", "fd00::2", "deploy")}
    assert resolve_host("web1", table) == table["web1"]
    assert resolve_host("localhost", table) is None
    assert resolve_host("root@web9:2200", table) == HostSpec("root@web9:2200", "web9", "root", 2200)
    with pytest.raises(ValueError):
        resolve_host("web1 ; true", table)
