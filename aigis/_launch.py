"""What runs for an internal or external plugin: argv, environment, working directory (pure).

Every backend runs exactly this spec; only how it is kept alive differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aigis._config import Settings
from aigis._manifest import Manifest
from aigis._states import Kind
from aigis._supervise.base import ProcessSpec
from aigis._supervise.units import plugin_user

#: The module an internal plugin's process runs (``python -m aigis._runner``).
RUNNER_MODULE = "aigis._runner"


def runner_argv(name: str, manifest: Manifest, python: str = sys.executable) -> tuple[str, ...]:
    """``python -m aigis._runner --name N --entrypoint D --launch L``."""
    return (
        python,
        "-m",
        RUNNER_MODULE,
        "--name",
        name,
        "--entrypoint",
        str(manifest.entrypoint),
        "--launch",
        str(manifest.launch),
    )


#: The credential carrying the plugin's own key into its unit (``$CREDENTIALS_DIRECTORY``).
AUTHKEY_CREDENTIAL = "authkey"


def process_spec(
    name: str,
    root: str,
    manifest: Manifest,
    settings: Settings,
    user: str | None = None,
    sandbox: bool = True,
) -> ProcessSpec:
    """The process of plugin ``name`` (checked out at ``root``) and how to supervise it.

    It runs as ``user`` (aigis.toml's per-plugin ``user``; None: the plugin's own account,
    ``aigis-NAME``), sandboxed unless ``sandbox`` is False; both apply under systemd."""
    kind = Kind(manifest.plugin_type)
    if kind not in (Kind.INTERNAL, Kind.EXTERNAL) or manifest.launch is None:
        raise ValueError(f'plugin "{name}": a {kind} plugin has no process')
    env = {
        "AIGIS_PLUGIN": name,
        "AIGIS_PLUGIN_DIR": root,
        "AIGIS_ADDRESS": str(settings.socket),
        "AIGIS_AUTHKEY_FILE": str(settings.plugin_key_file(name)),
        "PYTHONUNBUFFERED": "1",
    }
    argv = runner_argv(name, manifest) if kind is Kind.INTERNAL else tuple(manifest.launch)
    internal = kind is Kind.INTERNAL
    own_dir = Path(root)
    return ProcessSpec(
        name=name,
        kind=kind,
        argv=argv,
        cwd=manifest.entrypoint,
        env=env,
        restart=manifest.restart,
        restart_delay=settings.restart_delay,
        restart_delay_max=settings.restart_delay_max,
        stop_timeout=settings.stop_timeout,
        user=user or plugin_user(name),
        sandbox=sandbox,
        own_dir=own_dir,
        hidden_dir=settings.state_dir if own_dir.is_relative_to(settings.state_dir) else None,
        credentials={"AIGIS_AUTHKEY_FILE": AUTHKEY_CREDENTIAL} if internal else {},
        connects_to=(settings.socket,) if internal else (),
    )
