"""The core side of the proxy: authenticated connections, a thread each, one call dispatcher.

Nothing a peer sends is unpickled before it has passed multiprocess's HMAC challenge, every
frame is size-checked before a buffer is allocated, and one bad peer costs one log line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multiprocess.connection import answer_challenge, deliver_challenge
from multiprocess.context import AuthenticationError

from aigis._errors import AigisError
from aigis._rpc import wire
from aigis._rpc.channel import Channel, TruncatedFrame

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # an unauthenticated peer may not hold a thread longer than this
STOP_GRACE = 2.0  # seconds in-flight calls get to send their reply when the server stops
MAX_PENDING = 64  # unauthenticated connections at once; more are closed on accept
AUTHKEY_BYTES = 32
SOCKET_MODE = 0o660
AUTHKEY_MODE = 0o640

Resolve = Callable[[tuple[str, ...]], object]
_ALLOWED_CACHE = 4096


def load_or_create_authkey(path: Path) -> bytes:
    """The authkey in ``path``, created once (random 32 bytes, mode 0640) if it does not exist."""
    path = Path(path)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_authkey(path)
    except OSError as exc:
        raise AigisError(f"cannot read the AIGIS authkey file {path}: {exc.strerror}") from exc
    if not key:
        raise AigisError(f"the AIGIS authkey file {path} is empty")
    return key


def _create_authkey(path: Path) -> bytes:
    key = os.urandom(AUTHKEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fchmod(fd, AUTHKEY_MODE)  # explicit: the umask must not decide who can read it
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() is atomic and fails if another process created the key first: readers never
        # see a half-written file, and two cores starting at once agree on one key
        os.link(tmp, path)
    except FileExistsError:
        return path.read_bytes()
    except OSError as exc:
        raise AigisError(f"cannot create the AIGIS authkey file {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created: authkey file %s (mode 0640)", path)
    return key


class _Connection:
    """One accepted peer: its socket, its thread, and a lock so close and shutdown never race."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def shutdown(self, how: int) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(how)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.sock.close()


class CoreServer:
    """Serves ``resolve``'d skills to plugin processes on a Unix socket and optionally TCP."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        unix_path: Path,
        tcp: tuple[str, int] | None,
        authkey: bytes,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        stop_grace: float = STOP_GRACE,
        limit: int = wire.MAX_MESSAGE,
    ) -> None:
        if not authkey:
            raise ValueError("CoreServer needs a non-empty authkey")
        self._resolve = resolve
        self.unix_path = Path(unix_path)
        self._tcp_request = tcp
        self._authkey = bytes(authkey)
        self._handshake_timeout = handshake_timeout
        self._stop_grace = stop_grace
        self._limit = limit
        self._listeners: list[tuple[socket.socket, str]] = []
        self._accepters: list[threading.Thread] = []
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._unix_inode: int | None = None
        self._allowed: set[tuple[str, ...]] = set()  # paths already checked by wire.refusal
        self._tcp_address: tuple[str, int] | None = None
        self._pending = 0  # connections accepted but not yet authenticated
        self._flood_refused = 0
        self._flood_logged = -10.0

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP address (the real port when 0 was asked), or None without TCP."""
        return self._tcp_address

    def start(self) -> None:
        """Bind and listen, then accept in background threads; returns once listening."""
        if self._listeners:
            raise RuntimeError("CoreServer.start() called twice")
        try:
            self._listeners.append((self._bind_unix(self.unix_path), f"unix:{self.unix_path}"))
            if self._tcp_request is not None:
                sock = self._bind_tcp(*self._tcp_request)
                self._tcp_address = sock.getsockname()[:2]
                self._listeners.append((sock, f"tcp:{self._tcp_address[0]}:{self._tcp_address[1]}"))
        except BaseException:
            self._close_listeners()
            self._unlink_socket()  # e.g. the TCP port was taken: leave no socket file behind
            raise
        for sock, label in self._listeners:
            thread = threading.Thread(
                target=self._accept_loop, args=(sock, label), name=f"aigis-rpc-accept-{label}"
            )
            thread.daemon = True
            thread.start()
            self._accepters.append(thread)
            log.info("listening: %s", label)

    def stop(self) -> None:
        """Close the listeners, let in-flight calls reply, close every connection, unlink."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._close_listeners()
        for thread in self._accepters:
            thread.join()
        with self._lock:
            connections = list(self._connections)
        # SHUT_RD wakes idle connections with EOF but lets a call in progress send its reply
        for conn in connections:
            conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + self._stop_grace
        for conn in connections:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        busy = [c for c in connections if c.thread is not None and c.thread.is_alive()]
        for conn in busy:
            conn.shutdown(socket.SHUT_RDWR)
        if busy:
            log.warning("abandoned: %d connection(s) still inside a call", len(busy))
        self._unlink_socket()
        log.info("stopped: rpc server (%d connection(s) closed)", len(connections))

    # --- listening -------------------------------------------------------------------------

    def _bind_unix(self, path: Path) -> socket.socket:
        self._remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            os.chmod(path, SOCKET_MODE)  # before listen(): nobody can connect in between
            self._unix_inode = os.stat(path).st_ino
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise AigisError(f"cannot listen on unix socket {path}: {exc.strerror}") from exc
        return sock

    @staticmethod
    def _remove_stale_socket(path: Path) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise AigisError(f"cannot listen on unix socket {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left behind by a core that died
            log.info("removed: stale socket %s", path)
            return
        except OSError:
            pass  # e.g. a full backlog: someone is serving it
        finally:
            probe.close()
        raise AigisError(f"cannot listen on unix socket {path}: another AIGIS core is serving it")

    @staticmethod
    def _bind_tcp(host: str, port: int) -> socket.socket:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            return socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise AigisError(f"cannot listen on tcp {host}:{port}: {reason}") from exc

    def _close_listeners(self) -> None:
        for sock, _label in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            sock.close()

    def _unlink_socket(self) -> None:
        if self._unix_inode is None:
            return
        try:
            if os.stat(self.unix_path).st_ino == self._unix_inode:
                os.unlink(self.unix_path)  # only ours: a newer core may have replaced it
        except FileNotFoundError:
            pass

    def _accept_loop(self, listener: socket.socket, label: str) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if self._stopping:
                    return
                log.error("failed: accept on %s: %s", label, exc)
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            peer = _describe_peer(sock, address)
            conn = _Connection(sock, peer)
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                if self._pending >= MAX_PENDING:
                    # Unauthenticated peers cannot pile up threads and descriptors.
                    sock.close()
                    self._refuse_flood(peer)
                    continue
                self._pending += 1
                self._connections.add(conn)
            conn.thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"aigis-rpc-{peer}", daemon=True
            )
            conn.thread.start()

    # --- one connection --------------------------------------------------------------------

    def _serve(self, conn: _Connection) -> None:
        try:
            chan = self._authenticate(conn)
            if chan is not None:
                self._serve_calls(conn, chan)
        except Exception:
            log.exception("failed: connection from %s", conn.peer)
        finally:
            conn.close()
            with self._lock:
                self._connections.discard(conn)

    def _refuse_flood(self, peer: str) -> None:
        """Log the first refusal, then at most one line every 10 s."""
        now = time.monotonic()
        self._flood_refused += 1
        if now - self._flood_logged >= 10.0:
            log.warning(
                "refused: connection from %s: %d unauthenticated connections pending (%d refused)",
                peer,
                MAX_PENDING,
                self._flood_refused,
            )
            self._flood_logged = now

    def _authenticate(self, conn: _Connection) -> Channel | None:
        try:
            return self._handshake(conn)
        finally:
            with self._lock:
                self._pending -= 1

    def _handshake(self, conn: _Connection) -> Channel | None:
        sock = conn.sock
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._handshake_timeout)
        # the handshake frames are raw bytes capped at 256: nothing here is ever unpickled
        chan = Channel(sock, limit=self._limit)
        # settimeout bounds each read; this bounds the whole handshake (a byte every few
        # seconds must not hold a thread for ever). SHUT_RD wakes our blocked read with EOF;
        # the peer learns nothing until we have logged and closed.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            conn.shutdown(socket.SHUT_RD)

        deadline = threading.Timer(self._handshake_timeout, expire)
        deadline.daemon = True
        deadline.start()
        try:
            deliver_challenge(chan, self._authkey)
            answer_challenge(chan, self._authkey)
        except AuthenticationError:
            log.warning("refused: connection from %s: bad authkey", conn.peer)
            return None
        except Exception as exc:
            why = "timed out" if expired.is_set() else _why(exc)
            log.warning("refused: connection from %s: bad handshake (%s)", conn.peer, why)
            return None
        finally:
            deadline.cancel()
        sock.settimeout(None)
        log.debug("accepted: connection from %s", conn.peer)
        return chan

    def _serve_calls(self, conn: _Connection, chan: Channel) -> None:
        recv, send, dispatch = chan.recv_message, chan.send_message, self._dispatch
        while True:
            try:
                request = recv()
            except (TruncatedFrame, wire.FrameError) as exc:
                log.warning("dropped: connection from %s: %s", conn.peer, exc)
                return
            except EOFError:
                log.debug("closed: connection from %s", conn.peer)
                return
            except OSError as exc:
                log.debug("closed: connection from %s: %s", conn.peer, _why(exc))
                return
            reply = dispatch(request)
            try:
                try:
                    send(reply)
                except wire.FrameError as exc:
                    send(wire.encode_error(ValueError(f"the reply is too big: {exc}")))
            except OSError as exc:
                log.debug("closed: connection from %s: %s", conn.peer, _why(exc))
                return

    def _dispatch(self, request: memoryview) -> list[wire.Buffer]:
        try:
            path, args, kwargs = wire.decode_request(request)
        except Exception as exc:
            exc.add_note("raised in the AIGIS core while decoding the request")
            return self._error(exc)
        try:
            if path not in self._allowed:
                self._check(path)
            target = self._resolve(path)
            if args or kwargs:
                if not callable(target):
                    raise TypeError(
                        f"{wire.dotted(path)} is not callable ({type(target).__name__}); "
                        f"constants are read with no arguments"
                    )
                value = target(*args, **kwargs)
            else:
                value = target() if callable(target) else target
        except BaseException as exc:  # even SystemExit from a skill goes back to its caller
            return self._error(exc)
        try:
            return wire.encode_result(value)
        except Exception as exc:
            error = TypeError(
                f"{wire.dotted(path)} returned {type(value).__qualname__}, which cannot be "
                f"sent to a plugin: {exc}"
            )
            error.__cause__ = exc
            return self._error(error)

    @staticmethod
    def _error(exc: BaseException) -> list[wire.Buffer]:
        try:
            return wire.encode_error(exc)
        except Exception as failure:  # never leave a caller without a reply
            return wire.encode_error(RuntimeError(f"{type(exc).__name__}: {exc} ({failure})"))

    def _check(self, path: tuple[str, ...]) -> None:
        """Refuse dunders and internals before ``resolve`` ever sees the path."""
        reason = wire.refusal(path)
        if reason is not None:
            raise PermissionError(reason)
        if len(self._allowed) >= _ALLOWED_CACHE:
            self._allowed.clear()  # bounded, whatever paths a client makes up
        self._allowed.add(path)


_PEERCRED = struct.Struct("3i")


def _describe_peer(sock: socket.socket, address: Any) -> str:
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, _gid = _PEERCRED.unpack(creds)
            return f"pid {pid} uid {uid}"
        except (OSError, AttributeError):
            return "unix socket peer"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
