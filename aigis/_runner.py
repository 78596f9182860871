"""Entry point of an internal plugin process: ``python -m aigis._runner --name N --entrypoint D
--launch L`` installs the proxy as ``aigis``, imports LAUNCH and calls its ``launch()``.

Exit status: 0 when ``launch()`` returns, 1 when it raises (traceback on stderr) or when the
plugin cannot be started (one line on stderr naming the plugin).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from aigis._errors import AigisError, CoreUnavailable
from aigis._rpc.client import CoreClient, connect_from_env, describe
from aigis._rpc.proxy import make_proxy_module


class LaunchError(AigisError):
    """The plugin's LAUNCH module cannot be imported or has no ``launch()``."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the runner."""
    parser = argparse.ArgumentParser(
        prog="python -m aigis._runner", description="Run an AIGIS internal plugin."
    )
    parser.add_argument("--name", required=True, help="the plugin's name (for messages)")
    parser.add_argument("--entrypoint", required=True, help="the plugin's ENTRYPOINT directory")
    parser.add_argument("--launch", required=True, help="dotted module name or path to a .py file")
    return parser.parse_args(argv)


def install_proxy(client: CoreClient) -> ModuleType:
    """Make ``import aigis`` give the proxy, before any plugin code is imported."""
    module = make_proxy_module(client)
    sys.modules["aigis"] = module
    return module


def notify_ready(client: CoreClient) -> None:
    """Under systemd (``NOTIFY_SOCKET``), connect now and send ``READY=1`` once connected."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    client.connect()  # raises CoreUnavailable after the bounded retries
    try:
        import sdnotify
    except ImportError:
        print("aigis runner: sdnotify is not installed; READY=1 not sent", file=sys.stderr)
        return
    try:
        # debug=True: sdnotify otherwise swallows every error, and a lost READY is a timeout
        notifier = sdnotify.SystemdNotifier(debug=True)
        notifier.notify(
            f"READY=1\nSTATUS=connected to the AIGIS core at {describe(client.address)}"
        )
        notifier.socket.close()
    except Exception as exc:
        print(f"aigis runner: cannot notify systemd: {exc}", file=sys.stderr)


def import_launch(name: str, launch: str) -> ModuleType:
    """The LAUNCH module: a ``.py`` path (relative to the cwd) or a dotted module name."""
    if launch.endswith(".py") or os.sep in launch:
        path = Path(launch).resolve()
        if not path.is_file():
            raise LaunchError(f'plugin "{name}": LAUNCH file {path} does not exist')
        module_name = path.stem
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise LaunchError(f'plugin "{name}": cannot load LAUNCH file {path}')
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # registered first, as import does (dataclasses, pickle)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module
    try:
        return importlib.import_module(launch)
    except ModuleNotFoundError as exc:
        # only a missing LAUNCH module is ours to explain; a missing dependency keeps its traceback
        if exc.name is not None and (launch == exc.name or launch.startswith(exc.name + ".")):
            raise LaunchError(
                f'plugin "{name}": cannot import LAUNCH module "{launch}" from {os.getcwd()}: {exc}'
            ) from None
        raise


def find_launch(name: str, module: ModuleType) -> object:
    """The module's ``launch`` callable, or a LaunchError naming the plugin and the module."""
    launch = getattr(module, "launch", None)
    if not callable(launch):
        where = getattr(module, "__file__", None) or module.__name__
        raise LaunchError(
            f'plugin "{name}": module "{module.__name__}" ({where}) has no launch() function'
        )
    return launch


def main(argv: Sequence[str] | None = None) -> int:
    """Run one internal plugin; returns the process exit status."""
    args = parse_args(argv)
    entrypoint = Path(args.entrypoint).resolve()
    try:
        os.chdir(entrypoint)
    except OSError as exc:
        print(
            f'aigis runner: plugin "{args.name}": cannot enter ENTRYPOINT {entrypoint}: '
            f"{exc.strerror}",
            file=sys.stderr,
        )
        return 1
    try:
        client = connect_from_env()
    except AigisError as exc:
        print(f'aigis runner: plugin "{args.name}": {exc}', file=sys.stderr)
        return 1
    sys.path.insert(0, str(entrypoint))
    sys.argv = [args.launch]  # the plugin's argv: not the runner's options
    install_proxy(client)
    try:
        notify_ready(client)
        launch = find_launch(args.name, import_launch(args.name, args.launch))
    except LaunchError as exc:
        print(f"aigis runner: {exc}", file=sys.stderr)
        return 1
    except CoreUnavailable as exc:
        print(f'aigis runner: plugin "{args.name}": {exc}', file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    try:
        launch()  # type: ignore[operator]
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
