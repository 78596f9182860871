"""Where a plugin runs and what its process looks like on a remote host (pure).

``placement`` decides the host (the operator's ``host`` in aigis.toml over the manifest's
``HOST``); ``remote_spec`` turns the process the core would run here into the one the host runs:
paths re-rooted from the core's checkout to the host's copy, the interpreter of the host, the
AIGIS runtime shipped beside it, the core's TCP address, keys as credentials. ``parse_show``
reads the states of many units from one ``systemctl show``.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath

from aigis._errors import PluginError
from aigis._remote.hosts import HostSpec, parse_core_address, parse_ssh_forward, resolve_host
from aigis._states import Kind
from aigis._supervise.base import ProcessSpec, Shipment
from aigis._supervise.unitstate import UnitState

__all__ = [
    "HOST_ROOT",
    "REMOTE_TEMPLATE",
    "SHOW_PROPERTIES",
    "callback_line",
    "core_address",
    "core_forward",
    "parse_show",
    "placement",
    "rebase",
    "remote_spec",
]

#: Everything AIGIS keeps on a remote host, root's: ``ext/NAME`` (checkouts), ``keys/``,
#: ``lib/`` (the runtime internal plugins import), ``requirements/`` (stamps).
HOST_ROOT = "/var/lib/aigis"
EXT_DIR = f"{HOST_ROOT}/ext"
KEYS_DIR = f"{HOST_ROOT}/keys"
RUNTIME_DIR = f"{HOST_ROOT}/lib"
STAMPS_DIR = f"{HOST_ROOT}/requirements"
AUTHKEY_CREDENTIAL = "authkey"  # as aigis._launch names it
TLS_CERT_CREDENTIAL = "tls-cert"
TLS_CERT_ENV = "AIGIS_TLS_CERT_FILE"
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})

#: The unit template installed on a host that has none of its own (no AIGIS package there): the
#: [Service] lines of packaging/systemd/aigis-plugin@.service (a test keeps them equal).
REMOTE_TEMPLATE = """\
# Installed by AIGIS for plugins run from a core on another machine; each plugin's specifics are
# in /run/systemd/system/aigis-plugin@NAME.service.d/50-aigis.conf.
[Unit]
Description=AIGIS plugin %I

[Service]
ExecStart=/bin/sh -c 'echo "no AIGIS drop-in for this plugin: is it in /etc/aigis/aigis.toml?" >&2; exit 1'
Environment=PYTHONUNBUFFERED=1
KillMode=control-group
TimeoutStartSec=30s
TimeoutStopSec=10s
"""  # noqa: E501


def placement(
    name: str,
    kind: str,
    override: str | None,
    manifest_host: str,
    hosts: Mapping[str, HostSpec],
    own_names: Iterable[str] = (),
) -> HostSpec | None:
    """The host plugin ``name`` runs on (None: this machine): aigis.toml's ``host`` if set,
    else the manifest's ``HOST``; a name of ``[hosts]`` or an ssh destination. Core plugins
    always run in the core: a remote host for one is a PluginError."""
    value = override if override is not None else manifest_host
    where = "its host in aigis.toml" if override is not None else "HOST in its manifest"
    try:
        host = resolve_host(value, hosts, own_names)
    except ValueError as exc:
        raise PluginError(name, f"{where}: {exc}") from None
    if host is not None and kind == Kind.CORE:
        raise PluginError(
            name, f'{where} is "{value}", but core plugins run inside the core, on its machine'
        )
    return host


def rebase(value: str, local_root: str, remote_root: str) -> str:
    """``value`` with the leading ``local_root`` (as ``{root}`` expanded to) made
    ``remote_root``; anything else unchanged."""
    local = local_root.rstrip("/")
    if value == local:
        return remote_root
    if value.startswith(local + "/"):
        return remote_root + value[len(local) :]
    return value


def core_forward(host: HostSpec, tcp: tuple[str, int] | None) -> tuple[int, str, int] | None:
    """For a host with ``core_address = "ssh"``: (port on the host's loopback, address and port
    of the core's TCP listener as the core dials it) for the ssh connection to forward; None for
    a host whose plugins dial the core themselves. ValueError saying what to set when the core
    has no TCP listener to forward to."""
    port = parse_ssh_forward(host.core_address)
    if port is None:
        return None
    if tcp is None or tcp[1] == 0:
        listen = "none" if tcp is None else f'"{tcp[0]}:{tcp[1]}"'
        raise ValueError(
            f'hosts.{host.name}.core_address is "{host.core_address}", a forward to the core\'s '
            f"TCP listener, but [aigis] tcp is {listen}: set it to a fixed address and port "
            "(127.0.0.1:PORT is enough)"
        )
    address = tcp[0]
    if address in WILDCARDS:  # the core's own machine dials a wildcard listener on loopback
        address = "::1" if address == "::" else "127.0.0.1"
    elif address == "localhost":
        address = "127.0.0.1"
    return port or tcp[1], address, tcp[1]


def core_address(host: HostSpec, tcp: tuple[str, int] | None) -> str:
    """``AIGIS_ADDRESS`` for internal plugins on ``host``: its ``core_address``, the host's end
    of the ssh forward for ``ssh``, else the core's TCP listener when that names an address
    other machines can use. Raises ValueError saying what to set."""
    forward = core_forward(host, tcp)
    if forward is not None:
        address, port = "127.0.0.1", forward[0]
    elif host.core_address is not None:
        parsed = parse_core_address(host.core_address)
        assert parsed is not None  # checked when the [hosts] table was read
        address, port = parsed
    elif tcp is None:
        raise ValueError(
            f'internal plugins on host "{host.name}" connect back to the core over TCP: set '
            "[aigis] tcp (and hosts." + host.name + ".core_address if they reach it elsewhere)"
        )
    elif tcp[0] in WILDCARDS or tcp[0] in ("localhost", "127.0.0.1", "::1") or tcp[1] == 0:
        raise ValueError(
            f'[aigis] tcp listens on "{tcp[0]}:{tcp[1]}", which host "{host.name}" cannot '
            f"dial: set hosts.{host.name}.core_address to the core's address as that host sees "
            'it, or to "ssh" to forward it through the ssh connection'
        )
    else:
        address, port = tcp
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def callback_line(host: HostSpec, tcp: tuple[str, int] | None) -> str:
    """How internal plugins on ``host`` reach the core, for ``aigisctl check`` (ValueError as
    ``core_address``)."""
    forward = core_forward(host, tcp)
    if forward is not None:
        port, address, core_port = forward
        target = f"[{address}]:{core_port}" if ":" in address else f"{address}:{core_port}"
        return (
            f"internal plugins call back through the ssh connection (127.0.0.1:{port} on the "
            f"host, forwarded to {target})"
        )
    return f"internal plugins call back to {core_address(host, tcp).removeprefix('tcp:')}"


def remote_spec(
    spec: ProcessSpec,
    host: HostSpec,
    *,
    tcp: tuple[str, int] | None,
    key_file: Path,
    secrets: Sequence[tuple[str, Path]] = (),
    system_requirements: Sequence[str] = (),
    requirements: tuple[str, str, str, str] | None = None,
    tls_cert_file: Path | None = None,
    source: Path | None = None,
) -> ProcessSpec:
    """The process ``spec`` (as it would run here) as ``host`` runs it, with its Shipment.

    ``requirements``: (command, file or "", cwd, stamp) with local paths; ``secrets``: (path in the
    plugin directory, local file); ``tls_cert_file``: the core's certificate, pinned by
    internal plugins (None: plaintext TCP); ``source``: the tree to ship (the core's snapshot
    of the plugin's source; default the checkout)."""
    assert spec.own_dir is not None
    local_root, remote_root = str(spec.own_dir), f"{EXT_DIR}/{spec.name}"

    def moved(value: str) -> str:
        return rebase(value, local_root, remote_root)

    internal = spec.kind is Kind.INTERNAL
    key_path = f"{KEYS_DIR}/{spec.name}.key"
    env = {k: moved(v) for k, v in spec.env.items()}
    env.pop("AIGIS_AUTHKEY_FILE", None)
    files: list[tuple[str, Path]] = []
    credentials: dict[str, str] = {}
    if internal:
        cert_path = f"{KEYS_DIR}/core-cert.pem"
        env["AIGIS_ADDRESS"] = core_address(host, tcp)
        env["AIGIS_AUTHKEY_FILE"] = key_path
        env["PYTHONPATH"] = RUNTIME_DIR
        credentials["AIGIS_AUTHKEY_FILE"] = AUTHKEY_CREDENTIAL
        files.append((key_path, key_file))
        if tls_cert_file is not None:
            env[TLS_CERT_ENV] = cert_path
            credentials[TLS_CERT_ENV] = TLS_CERT_CREDENTIAL
            files.append((cert_path, tls_cert_file))
        # The runner of the host's interpreter: python -m aigis._runner ...
        argv = (host.python, *(moved(a) for a in spec.argv[1:]))
    else:
        env.pop("AIGIS_ADDRESS", None)  # the core's socket is not on that host
        argv = tuple(moved(a) for a in spec.argv)
    cwd = PurePosixPath(moved(str(spec.cwd)))
    program = argv[0]
    if "/" in program and not program.startswith("/"):
        argv = (str(cwd / program), *argv[1:])  # ExecStart= wants it absolute
    if requirements is not None:
        command, file, req_cwd, stamp = requirements
        requirements = (command, moved(file) if file else "", moved(req_cwd), stamp)
    shipment = Shipment(
        source=source or spec.own_dir,
        dest=remote_root,
        secrets=tuple(secrets),
        files=tuple(files),
        system_requirements=tuple(system_requirements),
        requirements=requirements,
        runtime=internal,
    )
    return replace(
        spec,
        argv=argv,
        cwd=Path(cwd),
        env=env,
        own_dir=Path(remote_root),
        hidden_dir=Path(EXT_DIR),
        credentials=credentials,
        connects_to=(),
        host=host,
        shipment=shipment,
    )


def requirements_line(shell: str, cwd: str) -> str:
    """The requirements command line (``aigis._requirements.requirements_shell``) as the host
    runs it: in ``cwd``, in a shell."""
    return f"cd {shlex.quote(cwd)} && {shell}"


#: What ``systemctl show`` reads per unit: the sources of UnitState (as in aigis._supervise.dbus).
SHOW_PROPERTIES = (
    "Id",
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "Type",
    "Restart",
    "NRestarts",
    "StartLimitBurst",
    "MainPID",
    "ExecMainStatus",
    "ExecMainCode",
    "ExecMainStartTimestamp",
    "StateChangeTimestamp",
    "Job",
    "NeedDaemonReload",
)


def show_argv(units: Sequence[str]) -> list[str]:
    """One ``systemctl show`` for every unit (blocks in the same order, blank-line separated)."""
    return [
        "systemctl", "show", "--timestamp=unix", "-p", ",".join(SHOW_PROPERTIES), "--", *units,
    ]  # fmt: skip


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _stamp(text: str) -> float:
    """``@1700000000`` (--timestamp=unix) as seconds; 0 for n/a or empty."""
    text = text.strip()
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            return 0.0
    return 0.0


def parse_show(text: str, units: Sequence[str]) -> list[UnitState]:
    """UnitStates from ``systemctl show`` output for ``units`` (in order; a unit systemd does
    not know reads as not-found)."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current.get("Id"):
                blocks[current["Id"]] = current
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    states = []
    for unit in units:
        p = blocks.get(unit, {})
        states.append(
            UnitState(
                unit=unit,
                load_state=p.get("LoadState", "not-found"),
                active_state=p.get("ActiveState", "inactive"),
                sub_state=p.get("SubState", "dead"),
                result=p.get("Result", ""),
                service_type=p.get("Type", ""),
                restart=p.get("Restart", "no"),
                n_restarts=_int(p.get("NRestarts", "0")),
                start_limit_burst=_int(p.get("StartLimitBurst", "0")),
                main_pid=_int(p.get("MainPID", "0")),
                exec_main_status=_int(p.get("ExecMainStatus", "0")),
                exec_main_code=_int(p.get("ExecMainCode", "0")),
                exec_main_start=_stamp(p.get("ExecMainStartTimestamp", "")),
                state_change=_stamp(p.get("StateChangeTimestamp", "")),
                job_id=_int(p.get("Job", "0") or "0"),
                need_reload=p.get("NeedDaemonReload", "no") == "yes",
            )
        )
    return states
