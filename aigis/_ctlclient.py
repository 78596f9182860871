"""``aigisctl``'s side of the control socket: one request per connection, every wait bounded,
and errors that tell "not running" from "not answering" from "refused"."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from aigis import _ctlwire as wire

DEFAULT_TIMEOUT = 5.0
TIMEOUT_ENV = "AIGISCTL_TIMEOUT"


class ControlError(Exception):
    """Talking to the core failed; the message is one line for the operator."""


class NotRunning(ControlError):
    """No core is listening on the control socket."""


class NotAnswering(ControlError):
    """A core accepted the connection but did not answer in time (stopped, hung, overloaded)."""


class Denied(ControlError):
    """This user may not use the control socket, or the core refused the key."""


class Failed(ControlError):
    """The core ran the operation and it failed: ``error`` is the exception's type name."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


def default_timeout() -> float:
    """``$AIGISCTL_TIMEOUT`` seconds, else 5."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if 0 < value < 1e6 else DEFAULT_TIMEOUT


def read_control_key(path: Path) -> bytes:
    """The control key; Denied when this user may not read it."""
    try:
        key = Path(path).read_bytes()
    except PermissionError:
        raise Denied(
            f"permission denied: {path} (members of the aigis group, or root, may use aigisctl)"
        ) from None
    except FileNotFoundError:
        raise NotRunning(f"the AIGIS core is not running (no control key at {path})") from None
    except OSError as exc:
        raise ControlError(f"cannot read the control key {path}: {exc.strerror}") from None
    if not key:
        raise ControlError(f"the control key file {path} is empty")
    return key


def request(
    socket_path: Path,
    key_file: Path,
    op: str,
    args: list[Any] | None = None,
    *,
    timeout: float | None = None,
    wait: bool = False,
) -> Any:
    """Run ``op(*args)`` in the core and return its plain-data value.

    ``timeout`` bounds connecting and the core's greeting (and the reply unless ``wait``:
    stopping or reloading plugins may legitimately take long)."""
    timeout = default_timeout() if timeout is None else timeout
    sock = _connect(Path(socket_path), timeout)
    try:
        deadline = time.monotonic() + timeout
        greeting = _read(sock, deadline, wire.MAX_REQUEST)
        nonce = bytes.fromhex(str(greeting.get("nonce", "")))
        key = read_control_key(key_file)
        ask = {"proof": wire.proof(key, nonce), "op": op, "args": list(args or [])}
        sock.sendall(wire.encode(ask, wire.MAX_REQUEST))
        reply = _read(sock, None if wait else time.monotonic() + timeout, wire.MAX_REPLY)
    except TimeoutError:
        raise NotAnswering(
            f"the AIGIS core does not answer on {socket_path} within {timeout:g} s "
            f"(stopped or hung? {TIMEOUT_ENV} sets the wait)"
        ) from None
    except ValueError as exc:  # a bad greeting or frame: not an AIGIS core, or a broken one
        raise ControlError(f"unexpected answer on {socket_path}: {exc}") from None
    except OSError as exc:
        raise NotAnswering(
            f"the AIGIS core closed the connection ({exc.strerror or exc}) on {socket_path}"
        ) from None
    finally:
        sock.close()
    if reply.get("ok") is True:
        return reply.get("value")
    error, message = str(reply.get("error", "Error")), str(reply.get("message", ""))
    if error == "Denied":
        raise Denied(message)
    raise Failed(error, message)


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except PermissionError:
        sock.close()
        raise Denied(
            f"permission denied: {path} (members of the aigis group, or root, may use aigisctl)"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NotRunning(f"the AIGIS core is not running (no core at {path})") from None
    except TimeoutError:
        sock.close()
        raise NotAnswering(
            f"the AIGIS core does not answer on {path} (no connection within {timeout:g} s)"
        ) from None
    except OSError as exc:
        sock.close()
        raise NotRunning(f"the AIGIS core is not running ({exc.strerror} on {path})") from None
    return sock


def _read(sock: socket.socket, deadline: float | None, limit: int) -> dict[str, Any]:
    header = _exactly(sock, wire.HEADER.size, deadline)
    return wire.decode(_exactly(sock, wire.frame_size(header, limit), deadline))


def _exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    """``size`` bytes; TimeoutError past ``deadline`` (None: wait as long as it takes)."""
    chunks, got = [], 0
    while got < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
        else:
            sock.settimeout(None)
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionResetError(0, "connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
