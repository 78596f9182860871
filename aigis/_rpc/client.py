"""The plugin side of the proxy: one lazy, persistent, authenticated connection per process.

A call whose request was fully handed to the kernel but whose reply never came raises
``CoreUnavailable`` instead of being sent again: it may already have run in the core. Only
failures before that point (connecting, authenticating, a send that failed) are retried, with
backoff, for ``retry_for`` seconds. With a ``call_timeout`` (``AIGIS_CALL_TIMEOUT``), a call
whose reply does not come in time raises ``CallTimeout`` and the connection is dropped: a reply
still owed on it must never be read as the answer to a later call.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multiprocess.connection import answer_challenge, deliver_challenge
from multiprocess.context import AuthenticationError

from aigis._errors import AigisError, CallTimeout, CoreUnavailable
from aigis._rpc import wire
from aigis._rpc.channel import Channel
from aigis._settings import HANDSHAKE_TIMEOUT

if TYPE_CHECKING:
    from aigis._rpc.tls import Pin

# The one place the plugin-side defaults live (AIGISTerminal, the runner, aigisctl).
DEFAULT_ADDRESS = "/run/aigis/aigis.sock"
DEFAULT_AUTHKEY_FILE = "/var/lib/aigis/authkey"  # [aigis] authkey_file default for root
ADDRESS_ENV = "AIGIS_ADDRESS"
AUTHKEY_FILE_ENV = "AIGIS_AUTHKEY_FILE"
CALL_TIMEOUT_ENV = "AIGIS_CALL_TIMEOUT"
TLS_CERT_FILE_ENV = "AIGIS_TLS_CERT_FILE"  # the core's certificate: TCP then speaks TLS, pinned
RETRY_FOR = 10.0  # seconds of reconnect attempts before CoreUnavailable
_PLAIN_CALLS = 4096  # framed requests of calls without arguments kept per client

Address = str | tuple[str, int]


def describe(address: Address) -> str:
    """An address as users write it in ``AIGIS_ADDRESS``."""
    if isinstance(address, tuple):
        return f"tcp:{address[0]}:{address[1]}"
    return str(address)


def parse_address(text: str) -> Address:
    """``/path/to.sock``, ``unix:/path``, or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6)."""
    if text.startswith("tcp:"):
        host, _, port = text[4:].rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isdigit() and 0 < int(port) < 65536:
            return (host, int(port))
    elif text.startswith("unix:") and len(text) > 5:
        return text[5:]
    elif text and ":" not in text.partition("/")[0]:
        return text
    raise AigisError(f'{ADDRESS_ENV}="{text}": expected a Unix socket path or tcp:HOST:PORT')


def read_authkey(path: Path) -> bytes:
    """The shared secret from an authkey file; errors name the file and the variable to set."""
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise AigisError(
            f"cannot read the AIGIS authkey file {path}: {reason} (set {AUTHKEY_FILE_ENV})"
        ) from exc
    if not key:
        raise AigisError(f"the AIGIS authkey file {path} is empty")
    return key


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no socket file (is the core running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the core running?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, EOFError):
        return "connection closed during the handshake"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


_clients: weakref.WeakSet[CoreClient] = weakref.WeakSet()


class CoreClient:
    """The connection of one process to the AIGIS core, opened on first use, shared by threads."""

    def __init__(
        self,
        address: Address | Path,
        authkey: bytes,
        *,
        retry_for: float = RETRY_FOR,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        limit: int = wire.MAX_MESSAGE,
        call_timeout: float | None = None,
        tls_cert_file: Path | None = None,
    ) -> None:
        if isinstance(address, tuple):
            self.address: Address = (address[0], int(address[1]))
        else:  # absolute: the runner changes directory before the first call
            self.address = os.path.abspath(os.fspath(address))
        self._tcp = isinstance(self.address, tuple)
        # TLS pinned to the core's certificate (TCP only: the Unix socket stays as it is)
        self._pin: Pin | None = None
        if self._tcp and tls_cert_file is not None:
            from aigis._rpc.tls import Pin  # ssl costs ~15 ms to import: only when used

            self._pin = Pin(tls_cert_file)
        self._authkey = bytes(authkey)
        self.retry_for = retry_for
        self.handshake_timeout = handshake_timeout
        self.limit = limit
        self.call_timeout = call_timeout  # seconds to wait for a reply; None: no limit
        self._lock = threading.Lock()
        self._chan: Channel | None = None
        self._opened = 0
        self._plain_calls: dict[tuple[str, ...], bytes] = {}  # path -> its framed plain call
        _clients.add(self)

    @property
    def connections_opened(self) -> int:
        """How many connections this client has opened (1 unless the core restarted)."""
        return self._opened

    def __repr__(self) -> str:
        return f"<CoreClient {describe(self.address)}>"

    def connect(self) -> None:
        """Open the connection now (retrying for ``retry_for`` s) instead of on the first call."""
        with self._lock:
            if self._chan is None:
                self._open(time.monotonic() + self.retry_for)

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        with self._lock:
            self._drop()

    def __enter__(self) -> CoreClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, path: tuple[str, ...], args: tuple = (), kwargs: Mapping | None = None) -> Any:
        """Evaluate ``aigis.<path>(*args, **kwargs)`` in the core and return its value."""
        request: bytes | list[wire.Buffer]
        if not args and not kwargs:
            try:
                request = self._plain_calls[path]
            except KeyError:
                request = self._plain_call(path)
            except TypeError:  # an unhashable path: the core says what is wrong with it
                request = wire.encode_request(path, (), {})
        else:
            if type(kwargs) is not dict:
                kwargs = dict(kwargs) if kwargs else {}
            request = wire.encode_request(path, args, kwargs)
        with self._lock:
            ok, value = self._roundtrip(path, request)
        if ok:
            return value
        raise value

    def _plain_call(self, path: tuple[str, ...]) -> bytes:
        """The whole frame of a call of ``path`` without arguments, made once and kept."""
        payload = wire.plain_call(path)
        frame = wire.frame_header(len(payload), self.limit) + payload
        if len(self._plain_calls) >= _PLAIN_CALLS:
            self._plain_calls.clear()  # bounded, whatever paths a plugin makes up
        self._plain_calls[path] = frame
        return frame

    def _roundtrip(
        self, path: tuple[str, ...], request: bytes | list[wire.Buffer]
    ) -> tuple[bool, Any]:
        deadline = None
        while True:
            chan = self._chan
            # a Unix socket reports a closed peer on send (EPIPE, so a retry is safe); TCP
            # buffers the send and reports on recv, when the call may have run: check first
            if self._tcp and chan is not None and chan.peer_closed():
                self._drop()
                chan = None
            if chan is None:
                if deadline is None:
                    deadline = time.monotonic() + self.retry_for
                chan = self._open(deadline)
            try:
                if isinstance(request, bytes):
                    chan.send_frame(request)
                else:
                    chan.send_message(request)
            except wire.FrameError:
                raise  # too big: nothing was sent, the connection is fine
            except OSError as exc:
                # the request never fully reached the core, so sending it again is safe
                self._drop()
                if deadline is None:
                    deadline = time.monotonic() + self.retry_for
                if time.monotonic() >= deadline:
                    raise self._unavailable(_reason(exc)) from exc
                continue
            except BaseException:
                self._drop()  # e.g. KeyboardInterrupt mid-send: the frame is incomplete
                raise
            try:
                reply = chan.recv_message()
            except TimeoutError as exc:
                self._drop()  # the reply is still owed on this connection: never reuse it
                raise CallTimeout(
                    f"cannot reach the AIGIS core at {describe(self.address)}: "
                    f"{wire.dotted(path)} did not reply within {self.call_timeout:g} s (it may "
                    f"or may not have run; not retried)"
                ) from exc
            except (OSError, EOFError, wire.FrameError) as exc:
                self._drop()
                raise self._unavailable(
                    f"connection lost while {wire.dotted(path)} was running (it may or may not "
                    f"have completed; not retried)"
                ) from exc
            except BaseException:
                self._drop()  # the reply is still owed on this connection: never reuse it
                raise
            try:
                return wire.decode_reply(reply)
            except Exception as exc:
                exc.add_note(f"while decoding the reply to {wire.dotted(path)} from the AIGIS core")
                return False, exc

    def _unavailable(self, reason: str) -> CoreUnavailable:
        return CoreUnavailable(f"cannot reach the AIGIS core at {describe(self.address)}: {reason}")

    def _open(self, deadline: float) -> Channel:
        delay = 0.05
        while True:
            try:
                chan = self._handshake(deadline)
            except AuthenticationError as exc:
                raise self._unavailable(
                    f"authentication failed: the authkey does not match the core's "
                    f"(check {AUTHKEY_FILE_ENV})"
                ) from exc
            except PermissionError as exc:
                raise self._unavailable(
                    f"permission denied ({exc.strerror}); is this user in the socket's group?"
                ) from exc
            except AssertionError as exc:
                raise self._unavailable("unexpected handshake: is this an AIGIS core?") from exc
            except AigisError as exc:  # TLS: not the pinned certificate, or no TLS at all
                raise self._unavailable(f"{exc} ({TLS_CERT_FILE_ENV})") from exc
            except (OSError, EOFError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    hint = ""
                    if self._tcp and self._pin is None:
                        hint = f"; if the core's TCP listener requires TLS, set {TLS_CERT_FILE_ENV}"
                    raise self._unavailable(
                        f"{_reason(exc)} (retried for {self.retry_for:g} s{hint})"
                    ) from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
                continue
            self._chan = chan
            self._opened += 1
            return chan

    def _handshake(self, deadline: float) -> Channel:
        timeout = max(0.1, min(self.handshake_timeout, deadline - time.monotonic()))
        if isinstance(self.address, tuple):
            sock = socket.create_connection(self.address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._pin is not None:
                try:
                    sock = self._pin.wrap(sock)
                except BaseException:
                    sock.close()
                    raise
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
        try:
            if not isinstance(self.address, tuple):
                sock.connect(self.address)
            chan = Channel(sock, limit=self.limit)
            answer_challenge(chan, self._authkey)
            deliver_challenge(chan, self._authkey)
            sock.settimeout(self.call_timeout)  # by default none: calls may take long
        except BaseException:
            sock.close()
            raise
        return chan

    def _drop(self) -> None:
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()

    def _after_fork(self) -> None:
        # the parent owns the socket and may hold the lock: start afresh in the child
        self._lock = threading.Lock()
        self._drop()
        self._opened = 0


def _reset_clients_after_fork() -> None:
    for client in list(_clients):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_clients_after_fork)


def connect_from_env(environ: Mapping[str, str] | None = None) -> CoreClient:
    """A client for ``AIGIS_ADDRESS`` and ``AIGIS_AUTHKEY_FILE`` (or the packaged defaults); TCP
    speaks TLS pinned to ``AIGIS_TLS_CERT_FILE`` when it is set."""
    env = os.environ if environ is None else environ
    address = parse_address(env.get(ADDRESS_ENV) or DEFAULT_ADDRESS)
    authkey = read_authkey(Path(env.get(AUTHKEY_FILE_ENV) or DEFAULT_AUTHKEY_FILE))
    cert = env.get(TLS_CERT_FILE_ENV)
    return CoreClient(
        address,
        authkey,
        call_timeout=parse_call_timeout(env.get(CALL_TIMEOUT_ENV)),
        tls_cert_file=Path(cert) if cert else None,
    )


def parse_call_timeout(text: str | None) -> float | None:
    """``AIGIS_CALL_TIMEOUT``: seconds a call may wait for its reply (unset or empty: no limit)."""
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise AigisError(f'{CALL_TIMEOUT_ENV}="{text}": expected a number of seconds > 0')
    return seconds
