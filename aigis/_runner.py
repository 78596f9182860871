"""Entry point of an internal plugin process: ``python -m aigis._runner --name N --entrypoint D
--launch L`` installs the proxy as ``aigis``, imports LAUNCH and calls its ``launch()``.

Exit status: 0 when ``launch()`` returns, 1 when it raises (traceback on stderr) or when the
plugin cannot be started (one line on stderr naming the plugin).
"""

from __future__ import annotations

import importlib
import os
import sys

from aigis._errors import AigisError, CoreUnavailable
from aigis._rpc.client import CoreClient, connect_from_env, describe
from aigis._rpc.proxy import make_proxy_module

# Every plugin process pays for what is imported here at start, so typing, pathlib, argparse
# and traceback are left out (or imported where needed): they cost about a quarter of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType


class LaunchError(AigisError):
    """The plugin's LAUNCH module cannot be imported or has no ``launch()``."""


class Options:
    """The runner's options: the plugin's name, its ENTRYPOINT, its LAUNCH."""

    __slots__ = ("entrypoint", "launch", "name")

    def __init__(self, name: str, entrypoint: str, launch: str) -> None:
        self.name, self.entrypoint, self.launch = name, entrypoint, launch


_OPTIONS = ("--name", "--entrypoint", "--launch")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Command-line options of the runner: the form AIGIS writes (``runner_argv``) is read
    directly; anything else (``--help``, a mistake) goes through argparse."""
    args = list(sys.argv[1:] if argv is None else argv)
    if (
        len(args) == 6
        and tuple(args[0::2]) == _OPTIONS
        and not any(a.startswith("-") for a in args[1::2])
    ):
        return Options(args[1], args[3], args[5])
    return _parse_with_argparse(args)


def _parse_with_argparse(argv: list[str]) -> Options:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m aigis._runner", description="Run an AIGIS internal plugin."
    )
    parser.add_argument("--name", required=True, help="the plugin's name (for messages)")
    parser.add_argument("--entrypoint", required=True, help="the plugin's ENTRYPOINT directory")
    parser.add_argument("--launch", required=True, help="dotted module name or path to a .py file")
    parsed = parser.parse_args(argv)
    return Options(parsed.name, parsed.entrypoint, parsed.launch)


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
        from importlib.util import module_from_spec, spec_from_file_location

        path = os.path.realpath(launch)
        if not os.path.isfile(path):
            raise LaunchError(f'plugin "{name}": LAUNCH file {path} does not exist')
        module_name = os.path.splitext(os.path.basename(path))[0]
        spec = spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise LaunchError(f'plugin "{name}": cannot load LAUNCH file {path}')
        module = module_from_spec(spec)
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
    entrypoint = os.path.realpath(args.entrypoint)
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
    sys.path.insert(0, entrypoint)
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
        _print_traceback()
        return 1
    try:
        launch()  # type: ignore[operator]
    except Exception:
        _print_traceback()
        return 1
    finally:
        client.close()
    return 0


def _print_traceback() -> None:
    import traceback

    traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
