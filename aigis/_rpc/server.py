"""The core side of the proxy: one I/O thread serves every connection, handshakes included.

Nothing a peer sends is unpickled before it has passed multiprocess's HMAC challenge (run as a
non-blocking state machine, ``handshake``), every frame is size-checked before it is buffered,
and buffers grow only as bytes arrive, within one budget for all partially received frames.

Calls run on the I/O thread itself: no thread handoff per request. A call that is still running
after ``INLINE_LIMIT`` seconds (a skill that sleeps or does I/O) while another peer waits keeps
its thread, and another thread takes over the I/O loop, so a slow skill never stalls the other
connections; when the call returns, its thread sends the reply, hands the connection back, and
waits to take over the loop at the next handover (or ends, if a thread already waits). Threads
therefore grow with slow calls in progress, never with connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aigis._errors import AigisError
from aigis._keys import load_or_create_key
from aigis._metrics import FOLD_EVERY, UNKNOWN_PLUGIN, Metrics
from aigis._rpc import tls, wire
from aigis._rpc.admission import Admission, RefusalLog
from aigis._rpc.handshake import HANDSHAKE_TIMEOUT, MAX_FRAME, Refused, ServerHandshake

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

STOP_GRACE = 2.0  # seconds in-flight calls get to send their reply when the server stops
MAX_PENDING = 128  # unauthenticated connections per listener; the oldest makes room
MAX_PENDING_PER_PEER = 32  # ... per peer (uid on the Unix socket, address on TCP)
FRAME_TIMEOUT = 60.0  # seconds a started frame may take to arrive in full
INFLIGHT_BUDGET = 2 * wire.MAX_MESSAGE  # bytes of partially received frames, all peers together
INLINE_LIMIT = 0.01  # a call running longer than this hands the I/O loop to a new thread
SOCKET_MODE = 0o660
AUTHKEY_MODE = 0o600

Resolve = Callable[[tuple[str, ...]], object]
ROOT = "root"  # the identity of whoever holds the authkey (aigisctl shell, AIGISTerminal)


_ALLOWED_CACHE = 4096
_PLAIN_CALL_MAX = 512  # bytes of a plain call's payload kept as a key (longer paths: decoded)
_NONE_FRAME = wire.HEADER.pack(len(wire.NONE_RESULT)) + wire.NONE_RESULT


def load_or_create_authkey(path: Path) -> bytes:
    """The authkey in ``path``, created once (random bytes, mode 0600) if it does not exist: the
    full proxy is root's (``aigisctl shell``); plugins get it as a systemd credential or run as
    the core's own user."""
    return load_or_create_key(Path(path), "AIGIS authkey", AUTHKEY_MODE)


_clock = time.perf_counter_ns
_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_pack_header = wire.HEADER.pack
_unpack_header = wire.HEADER.unpack_from
_SCRATCH = 256 * 1024  # one receive buffer per I/O thread, shared by every connection
_FIRST_BUFFER = 64 * 1024
_SMALL_SEND = 64 * 1024
# asked for each Unix connection (doubled by the kernel): a 1 MiB result leaves in one call
# instead of ~5 trips through the loop; TCP sizes its own buffers. Root may exceed
# net.core.wmem_max (212992 on a stock kernel: a 1 MiB result would still take 3 trips)
_UNIX_SEND_BUFFER = 1 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux; not exported by Python
_MAX_IOV = 512  # below IOV_MAX (1024)
_ACCEPT_BATCH = 64
_BACKLOG = 1024
_PARK_AFTER = 100  # watchdog ticks without a call before it sleeps until the next call


class _Conn:
    """One accepted peer: its socket, its handshake until authenticated, and its buffers.

    Only the thread running the I/O loop touches a connection, except while ``busy``: then the
    thread running its slow call owns it, until it hands it back.
    """

    __slots__ = (
        "sock", "peer", "peer_key", "listener", "handshake", "deadline", "buf", "have",
        "frame_deadline", "out", "events", "busy", "leftover", "failed", "closed", "identity",
        "securing",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, peer: str, peer_key: object, listener: str) -> None:
        self.sock = sock
        self.peer = peer
        self.peer_key = peer_key
        self.listener = listener
        self.handshake: ServerHandshake | None = None
        self.deadline = 0.0  # of the handshake
        self.buf: bytearray | None = None  # received bytes not processed yet (a partial frame)
        self.have = 0  # bytes of ``buf`` filled
        self.frame_deadline = 0.0
        self.out: list[memoryview] | None = None  # reply bytes the socket has not taken yet
        self.events = 0  # what the selector watches for; 0: not registered
        self.busy = False
        self.leftover = b""  # bytes received behind the frame of a slow call
        self.failed = False  # the reply of a slow call could not be sent
        self.closed = False
        self.identity = ""  # who proved a key: a plugin's name, or ROOT for the authkey
        self.securing = False  # in the TLS handshake (before the authkey handshake)


class CoreServer:
    """Serves ``resolve``'d skills to plugin processes on a Unix socket and optionally TCP.

    With ``tls_context`` (see ``tls.server_context``) the TCP listener speaks TLS: the TLS
    handshake is part of the pending phase (same budgets, same deadline) and the authkey
    handshake runs inside it. The Unix socket never uses TLS.
    """

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
        max_pending: int = MAX_PENDING,
        max_pending_per_peer: int = MAX_PENDING_PER_PEER,
        frame_timeout: float = FRAME_TIMEOUT,
        inflight_budget: int = INFLIGHT_BUDGET,
        inline_limit: float = INLINE_LIMIT,
        metrics: Metrics | None = None,
        keys: Callable[[], Mapping[str, bytes]] | None = None,
        authorize: Callable[[tuple[str, ...], str], None] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if not authkey:
            raise ValueError("CoreServer needs a non-empty authkey")
        self._resolve = resolve
        # the metrics hook, resolved once: the C functions to call, and where they fold
        self._hook: tuple[Callable[[], int], Callable[[tuple], None], Metrics] | None = (
            (*metrics.recorder(), metrics) if metrics is not None else None
        )
        # without per-plugin keys every caller holds the authkey: they are all "plugin"
        self._fixed_caller = UNKNOWN_PLUGIN if keys is None else ""
        self._keys = keys  # each plugin's own key, by plugin name (besides the authkey)
        self._authorize = authorize  # raises PermissionError when a caller may not call a path
        self.unix_path = Path(unix_path)
        self._tcp_request = tcp
        self._tls = tls_context
        # TLS connections whose decrypted bytes wait inside TLS, unseen by epoll
        self._buffered: dict[_Conn, None] = {}
        self._authkey = bytes(authkey)
        self._handshake_timeout = handshake_timeout
        self._stop_grace = stop_grace
        self._limit = limit
        self._frame_timeout = frame_timeout
        self._budget = inflight_budget
        self._inline_limit = inline_limit
        self._listeners: list[tuple[socket.socket, str]] = []
        self._selector: select.epoll | None = None
        self._fds: dict[int, Any] = {}  # what each registered descriptor is: conn, listener
        self._connections: dict[int, _Conn] = {}  # by file descriptor
        self._admission = Admission(max_pending, max_pending_per_peer)
        self._refusals = RefusalLog()
        self._partial: dict[_Conn, None] = {}  # holding a partial frame, oldest first
        self._paused: dict[_Conn, None] = {}  # waiting for room in the in-flight budget
        self._inflight = 0
        self._accept_paused: dict[socket.socket, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._generation = 0  # which thread runs the I/O loop; bumped when a call is slow
        # the call running on the I/O thread, as a one-item list: whoever pops the item (the
        # I/O thread when the call returns, or the watchdog when it is slow) decides its fate
        self._calling: list[_Conn] | None = None
        self._spare: list[int] | None = None  # a thread that lost the loop, waiting to take it
        self._spare_ready = threading.Condition(self._lock)
        self._handback: list[_Conn] = []
        self._wake_r = self._wake_w = -1
        self._watch_parked = False
        self._watch_event = threading.Event()
        self._stopping = False
        self._stop_deadline: float | None = None
        self._closed_on_stop = 0
        self._done = threading.Event()
        self._unix_inode: int | None = None
        self._allowed: set[tuple[str, ...]] = set()  # paths already checked by wire.refusal
        # payloads of calls without arguments (wire.plain_call) of allowed paths: no unpickling
        self._plain_calls: dict[bytes, tuple[str, ...]] = {}
        self._tcp_address: tuple[str, int] | None = None
        self.handoffs = 0  # times a slow call handed the I/O loop to another thread

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP address (the real port when 0 was asked), or None without TCP."""
        return self._tcp_address

    @property
    def inflight_bytes(self) -> int:
        """Bytes held for partially received frames, all connections together."""
        return self._inflight

    def start(self) -> None:
        """Bind and listen, then serve on a background thread; returns once listening."""
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
        self._selector = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, _READ)
        self._fds[self._wake_r] = None
        for sock, label in self._listeners:
            sock.setblocking(False)
            self._selector.register(sock.fileno(), _READ)
            self._fds[sock.fileno()] = (sock, label)
            mode = "" if sock.family == socket.AF_UNIX else " (plaintext)"
            log.info("listening: %s%s", label, " (TLS)" if mode and self._tls else mode)
        self._spawn_loop(0)
        threading.Thread(target=self._watch, name="aigis-rpc-watch", daemon=True).start()

    def stop(self) -> None:
        """Stop listening, let in-flight calls reply, close every connection, unlink."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._selector is None:
            self._close_listeners()
            self._unlink_socket()
            return
        self._wake()
        self._watch_event.set()
        if not self._done.wait(self._stop_grace + 10.0):
            log.error("failed: rpc I/O loop did not stop")
        self._unlink_socket()
        log.info("stopped: rpc server (%d connection(s) closed)", self._closed_on_stop)

    # --- listening -------------------------------------------------------------------------

    def _bind_unix(self, path: Path) -> socket.socket:
        self._remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            os.chmod(path, SOCKET_MODE)  # before listen(): nobody can connect in between
            self._unix_inode = os.stat(path).st_ino
            sock.listen(_BACKLOG)
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
            return socket.create_server((host, port), family=family, backlog=_BACKLOG)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise AigisError(f"cannot listen on tcp {host}:{port}: {reason}") from exc

    def _close_listeners(self) -> None:
        for sock, _label in self._listeners:
            if self._selector is not None and self._fds.pop(sock.fileno(), False) is not False:
                with contextlib.suppress(OSError, ValueError):
                    self._selector.unregister(sock.fileno())
            sock.close()

    def _unlink_socket(self) -> None:
        if self._unix_inode is None:
            return
        try:
            if os.stat(self.unix_path).st_ino == self._unix_inode:
                os.unlink(self.unix_path)  # only ours: a newer core may have replaced it
        except FileNotFoundError:
            pass

    # --- the I/O loop ----------------------------------------------------------------------

    def _spawn_loop(self, generation: int) -> None:
        thread = threading.Thread(
            target=self._run, args=(generation,), name="aigis-rpc-io", daemon=True
        )
        thread.start()

    def _run(self, generation: int | None) -> None:
        while generation is not None:
            self._loop(generation)
            generation = self._await_loop()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is awake enough
            os.write(self._wake_w, b"\0")

    def _loop(self, generation: int) -> None:
        scratch = memoryview(bytearray(_SCRATCH))
        assert self._selector is not None
        poll, fds = self._selector.poll, self._fds
        try:
            timed = True
            while self._generation == generation:
                timeout = self._timeout() if timed else None
                for fd, mask in poll(-1 if timeout is None else timeout):
                    conn = fds.get(fd, False)
                    if conn is False:
                        continue  # closed by an earlier event of this batch
                    if conn.__class__ is _Conn:
                        try:
                            if conn.closed:
                                continue
                            if conn.busy:
                                self._set_events(conn, 0)  # its call's thread owns it for now
                            elif mask & _WRITE:
                                self._flush(conn, generation)
                            elif conn.handshake is not None:
                                self._on_handshake(conn)
                            elif conn.buf is None:
                                self._on_readable(conn, scratch, generation)
                            else:
                                self._on_partial(conn, generation)
                        except Exception:
                            log.exception("failed: connection from %s", conn.peer)
                            if self._generation == generation:
                                self._close(conn)
                    elif conn is None:
                        self._on_wakeup(generation)
                    else:
                        self._accept(*conn)
                    if self._generation != generation:
                        return  # a slow call kept this thread; another one runs the loop now
                # anything with a deadline: handshakes, partial frames, a paused listener
                timed = bool(
                    self._partial
                    or self._admission.pending
                    or self._accept_paused
                    or self._stopping
                    or self._buffered
                )
                if timed:
                    self._expire(time.monotonic())
                if self._buffered:
                    self._serve_buffered(generation, scratch)
                if self._stopping and self._stop_step():
                    return
        except BaseException:
            log.exception("failed: rpc I/O loop")
            self._finish()

    def _timeout(self) -> float | None:
        deadline = None
        for conn in self._pending():
            if deadline is None or conn.deadline < deadline:
                deadline = conn.deadline
        if self._partial:
            first = next(iter(self._partial)).frame_deadline
            deadline = first if deadline is None else min(deadline, first)
        for when, _label in self._accept_paused.values():
            deadline = when if deadline is None else min(deadline, when)
        if self._stop_deadline is not None:
            deadline = min(deadline or self._stop_deadline, self._stop_deadline)
        if self._buffered and any(map(self._readable, self._buffered)):
            return 0.0
        if deadline is None:
            return None
        return max(0.0, deadline - time.monotonic())

    def _pending(self) -> Iterator[_Conn]:
        """Unauthenticated connections, oldest first (Admission keeps only our _Conn objects)."""
        return cast("Iterator[_Conn]", self._admission.oldest())

    def _expire(self, now: float) -> None:
        while True:
            late = [conn for conn in self._pending() if conn.deadline <= now]
            if not late:
                break
            for conn in late:
                self._refuse(conn, self._late(conn))
        while self._partial:
            conn = next(iter(self._partial))
            if conn.frame_deadline > now:
                break
            self._drop(conn, f"a frame was still incomplete after {self._frame_timeout:g} s")
        for sock, (when, label) in list(self._accept_paused.items()):
            if when <= now and self._selector is not None:
                del self._accept_paused[sock]
                self._selector.register(sock.fileno(), _READ)
                self._fds[sock.fileno()] = (sock, label)

    def _set_events(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        assert self._selector is not None
        fd = conn.sock.fileno()
        if not conn.events:
            self._selector.register(fd, events)
            self._fds[fd] = conn
        elif not events:
            self._selector.unregister(fd)
            del self._fds[fd]
        else:
            self._selector.modify(fd, events)
        conn.events = events

    def _on_wakeup(self, generation: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        with self._lock:
            back, self._handback = self._handback, []
        for i, conn in enumerate(back):
            if self._generation != generation:
                with self._lock:  # lost the loop to another slow call: pass the rest on
                    self._handback.extend(back[i:])
                self._wake()
                return
            conn.busy = False
            if conn.closed:
                continue
            if conn.failed:
                self._close(conn)
                continue
            if conn.leftover:
                self._stash(conn, memoryview(conn.leftover))
                conn.leftover = b""
            if conn.out is not None:
                self._set_events(conn, _WRITE)
            else:
                self._set_events(conn, _READ)
                if conn.buf is not None:
                    self._process_buffer(conn, generation)

    # --- stopping --------------------------------------------------------------------------

    def _stop_step(self) -> bool:
        """One step of a graceful stop; True once every connection is closed."""
        now = time.monotonic()
        if self._stop_deadline is None:
            self._stop_deadline = now + self._stop_grace
            self._close_listeners()
            self._accept_paused.clear()
            self._closed_on_stop = len(self._connections)
            for conn in list(self._connections.values()):
                if conn.handshake is not None:
                    self._close(conn)
                else:
                    # EOF for idle connections once their buffered requests are answered; a
                    # call in progress still sends its reply
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RD)
        if self._connections and now < self._stop_deadline:
            return False
        busy = [conn for conn in self._connections.values() if conn.busy]
        for conn in list(self._connections.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self._close(conn)
        if busy:
            log.warning("abandoned: %d connection(s) still inside a call", len(busy))
        self._finish()
        return True

    def _finish(self) -> None:
        unreported = self._refusals.flush()
        if unreported:
            log.warning("refused: %d more connection(s) (not logged)", unreported)
        self._generation += 1  # no thread runs the loop any more
        if self._selector is not None:
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._done.set()
        self._watch_event.set()
        with self._lock:
            self._spare_ready.notify_all()

    # --- accepting and the handshake -------------------------------------------------------

    def _accept(self, listener: socket.socket, label: str) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if self._stopping:
                    return
                log.error("failed: accept on %s: %s", label, _why(exc))
                # e.g. out of file descriptors: do not spin on a listener that stays readable
                assert self._selector is not None
                self._selector.unregister(listener.fileno())
                del self._fds[listener.fileno()]
                self._accept_paused[listener] = (time.monotonic() + 0.1, label)
                return
            try:
                self._admit(sock, address, label)
            except OSError as exc:  # e.g. the peer reset before we could look at it
                log.debug("closed: connection on %s: %s", label, _why(exc))
                self._discard(sock)
            except Exception:  # one peer's trouble, never the loop's: it serves everyone
                log.exception("failed: connection on %s", label)
                self._discard(sock)

    def _discard(self, sock: socket.socket) -> None:
        """Close a socket ``_admit`` failed on, with whatever it had already recorded."""
        conn = self._connections.get(sock.fileno()) if sock.fileno() >= 0 else None
        if conn is not None and conn.sock is sock:
            self._close(conn)
        else:
            sock.close()

    def _authkey_for(self, conn: _Conn) -> bytes | dict[str, bytes]:
        """The keys ``conn`` may prove it holds, by identity: the authkey (the full proxy, ROOT)
        and, when the core hands out per-plugin keys, each plugin's own."""
        if self._keys is None:
            return self._authkey
        return {**self._keys(), ROOT: self._authkey}

    def _admit(self, sock: socket.socket, address: Any, label: str) -> None:
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            _grow_send_buffer(sock)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer, peer_key = _identify(sock, address)
        conn = _Conn(sock, peer, peer_key, label)
        conn.handshake = ServerHandshake(self._authkey_for(conn))
        conn.deadline = time.monotonic() + self._handshake_timeout
        self._connections[sock.fileno()] = conn
        for old in cast("list[_Conn]", self._admission.admit(conn, label, peer_key)):
            self._refuse(
                old, f"evicted by a newer one ({self._admission.count(label)} pending on {label})"
            )
        if self._tls is not None and sock.family != socket.AF_UNIX:
            # TLS is set up once the client speaks (its ClientHello): an idle connection costs
            # no TLS state (~40 KiB each with OpenSSL 3)
            conn.securing = True
            self._set_events(conn, _READ)
            return
        self._send_small(conn, conn.handshake.challenge())
        if not conn.closed:
            self._set_events(conn, _WRITE if conn.out is not None else _READ)

    def _on_handshake(self, conn: _Conn) -> None:
        """Read handshake frames exactly, never past the last one.

        What follows the handshake is a request: it is read like any other, within the
        in-flight budget.
        """
        if conn.securing:
            self._secure(conn)
            if conn.securing or conn.closed:
                return
        while conn.handshake is not None:
            data = conn.leftover
            try:
                want = 4 - len(data) if len(data) < 4 else 4 + wire.frame_size(data, MAX_FRAME)
            except wire.FrameError as exc:
                if tls.looks_like_client_hello(data) and not isinstance(
                    conn.sock, tls.ServerSocket
                ):
                    exc = wire.FrameError(f"a TLS client on a plaintext listener: {exc}")
                self._refuse(conn, f"bad handshake ({exc})")
                return
            if want > len(data):
                try:
                    chunk = conn.sock.recv(want - len(data))
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._refuse(conn, f"bad handshake ({_why(exc)})")
                    return
                if not chunk:
                    middle = " in the middle of a message" if data else ""
                    self._refuse(conn, f"bad handshake (connection closed{middle})")
                    return
                conn.leftover = data + chunk
                continue
            conn.leftover = b""
            try:
                reply = conn.handshake.feed(data[4:])
            except Refused as refusal:
                if refusal.reply is not None:
                    self._send_small(conn, refusal.reply)
                self._refuse(conn, str(refusal))
                return
            if reply is not None:
                self._send_small(conn, reply)
                if conn.closed:
                    return
            if conn.handshake.done:
                conn.identity = conn.handshake.identity or ROOT
                conn.handshake = None
                self._admission.release(conn, conn.listener)
                log.debug("accepted: connection from %s", conn.peer)

    def _secure(self, conn: _Conn) -> None:
        """Advance a TLS handshake; once it is done, start the authkey handshake inside it."""
        if not isinstance(conn.sock, tls.ServerSocket) and not self._wrap(conn):
            return
        sock = cast("tls.ServerSocket", conn.sock)
        try:
            wants = sock.advance()
        except tls.TlsError as exc:
            self._refuse(conn, str(exc))
            return
        if wants is not None:
            self._set_events(conn, _READ if wants == "read" else _WRITE)
            return
        conn.securing = False
        assert conn.handshake is not None
        self._send_small(conn, conn.handshake.challenge())
        if not conn.closed:
            self._set_events(conn, _WRITE if conn.out is not None else _READ)

    def _wrap(self, conn: _Conn) -> bool:
        """Put TLS on a connection whose client has spoken; False if it is gone (refused)."""
        assert self._tls is not None
        raw = conn.sock
        fd = raw.fileno()
        # out of the loop's books while ssl takes the descriptor over: if it fails half-way,
        # nothing points at a descriptor the raw socket no longer owns
        self._set_events(conn, 0)
        del self._connections[fd]
        try:
            sock = tls.accept(self._tls, raw)
        except OSError as exc:
            self._refuse(conn, f"bad TLS handshake ({_why(exc)})")
            return False
        conn.sock = sock
        self._connections[fd] = conn
        sock.watch(self._buffered, conn)
        return True

    def _late(self, conn: _Conn) -> str:
        """Why a pending connection is refused at its deadline."""
        if not conn.securing:
            return "bad handshake (timed out)"
        return f"no TLS handshake within {self._handshake_timeout:g} s ({tls.PLAINTEXT_HINT})"

    def _readable(self, conn: _Conn) -> bool:
        return conn.events == _READ and not conn.busy and not conn.closed

    def _serve_buffered(self, generation: int, scratch: memoryview) -> None:
        """Read TLS connections whose decrypted bytes epoll cannot report (see ``tls``)."""
        for conn in list(self._buffered):
            if self._generation != generation:
                return
            if conn.closed or not cast("tls.ServerSocket", conn.sock).waiting():
                self._buffered.pop(conn, None)
                continue
            if not self._readable(conn):
                continue  # served once it reads again
            del self._buffered[conn]  # the read puts it back if bytes are still left
            try:
                if conn.handshake is not None:
                    self._on_handshake(conn)
                elif conn.buf is None:
                    self._on_readable(conn, scratch, generation)
                else:
                    self._on_partial(conn, generation)
            except Exception:
                log.exception("failed: connection from %s", conn.peer)
                if self._generation == generation:
                    self._close(conn)

    def _refuse(self, conn: _Conn, reason: str) -> None:
        """Close an unauthenticated connection; log it unless refusals are flooding the log."""
        allowed, unreported = self._refusals.allow(time.monotonic())
        if unreported:
            log.warning("refused: %d more connection(s) (not logged)", unreported)
        if allowed:
            log.warning("refused: connection from %s: %s", conn.peer, reason)
        self._close(conn)

    # --- authenticated connections ---------------------------------------------------------

    def _on_readable(self, conn: _Conn, scratch: memoryview, generation: int) -> None:
        room = self._budget - self._inflight
        if room <= 0:
            self._read_whole_frames(conn, scratch, generation)
            return
        # what is left over of the budget, when less than the scratch buffer
        got = self._receive(conn, scratch, room if room < _SCRATCH else _SCRATCH)
        if got:
            self._frames(conn, scratch, 0, got, generation)

    def _receive(self, conn: _Conn, scratch: memoryview, size: int, flags: int = 0) -> int:
        """Bytes received into ``scratch`` (0 when none are there now); a peer that closed or
        failed is closed here and gives 0 too."""
        try:
            got = conn.sock.recv_into(scratch, size, flags)
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.debug("closed: connection from %s: %s", conn.peer, _why(exc))
            self._close(conn)
            return 0
        if not got:
            log.debug("closed: connection from %s", conn.peer)
            self._close(conn)
        return got

    def _read_whole_frames(self, conn: _Conn, scratch: memoryview, generation: int) -> None:
        """No room to buffer a partial frame: take only complete frames, or wait for room."""
        got = self._receive(conn, scratch, len(scratch), socket.MSG_PEEK)
        if not got:
            return
        pos = 0
        while got - pos >= 4:
            size = _unpack_header(scratch, pos)[0]
            if not 0 <= size <= self._limit or got - pos - 4 < size:
                break
            pos += 4 + size
        if not pos:
            self._set_events(conn, 0)
            self._paused[conn] = None
            return
        got = conn.sock.recv_into(scratch, pos)
        self._frames(conn, scratch, 0, got, generation)

    def _on_partial(self, conn: _Conn, generation: int) -> None:
        """Read more of a partial frame into its own buffer, grown as bytes arrive."""
        buf = conn.buf
        assert buf is not None
        have = conn.have
        if have == len(buf):
            want = 4 + _unpack_header(buf, 0)[0] if have >= 4 else 4
            room = self._budget - self._inflight
            size = min(want, max(2 * have, _FIRST_BUFFER), have + room)
            if size <= have:
                self._set_events(conn, 0)  # wait for room in the in-flight budget
                self._paused[conn] = None
                return
            grown = bytearray(size)
            grown[:have] = buf
            self._inflight += size - len(buf)
            conn.buf = buf = grown
        try:
            got = conn.sock.recv_into(memoryview(buf)[have:])
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("closed: connection from %s: %s", conn.peer, _why(exc))
            self._close(conn)
            return
        if not got:
            self._drop(conn, "connection closed in the middle of a message")
            return
        conn.have = have + got
        self._process_buffer(conn, generation)

    def _process_buffer(self, conn: _Conn, generation: int) -> None:
        """Serve the complete frames in ``conn.buf``, keeping what follows them."""
        buf, have = conn.buf, conn.have
        assert buf is not None
        if have < 4:
            return
        size = _unpack_header(buf, 0)[0]
        if not 0 <= size <= self._limit:
            self._frame_error(conn, buf, 0)
            return
        if have - 4 < size:
            return
        self._release_buffer(conn)
        self._frames(conn, memoryview(buf), 0, have, generation)

    def _frames(self, conn: _Conn, data: memoryview, pos: int, end: int, generation: int) -> None:
        """Serve the complete frames in ``data[pos:end]``; keep a partial one for later."""
        limit = self._limit
        while end - pos >= 4:
            size = _unpack_header(data, pos)[0]
            if not 0 <= size <= limit:
                self._frame_error(conn, data, pos)
                return
            if end - pos - 4 < size:
                break
            start, pos = pos + 4, pos + 4 + size
            self._calling = calling = [conn]
            if self._watch_parked:
                self._watch_event.set()
            reply = self._dispatch(data[start:pos], conn.identity)
            self._calling = None
            try:
                calling.pop()
            except IndexError:
                # the watchdog took this call off the loop (it was slow), and another thread
                # runs the loop now: reply, hand the connection back with whatever followed
                # the request, and leave
                with self._lock:  # the watchdog finishes handing the loop over first
                    pass
                conn.failed = not self._send(conn, reply)
                conn.leftover = bytes(data[pos:end])
                with self._lock:
                    self._handback.append(conn)
                self._wake()
                return
            if reply.__class__ is bytes:  # a whole frame: the usual, small reply
                sent = self._send_frame(conn, reply)
            else:
                sent = self._send(conn, reply)
            if not sent:
                self._close(conn)
                return
            if conn.out is not None:
                self._set_events(conn, _WRITE)  # read on once the reply is out
                break
        if pos < end:
            self._stash(conn, data[pos:end])

    def _stash(self, conn: _Conn, data: memoryview) -> None:
        """Keep received bytes that do not make a whole frame yet (counted in the budget)."""
        buf = bytearray(data)
        conn.buf, conn.have = buf, len(buf)
        self._inflight += len(buf)
        conn.frame_deadline = time.monotonic() + self._frame_timeout
        self._partial[conn] = None

    def _release_buffer(self, conn: _Conn) -> None:
        if conn.buf is not None:
            self._inflight -= len(conn.buf)
            conn.buf, conn.have = None, 0
            self._partial.pop(conn, None)
            if self._paused:
                paused, self._paused = self._paused, {}
                for other in paused:  # room again: they try again (and pause again if none)
                    if not other.closed and not other.busy:
                        self._set_events(other, _WRITE if other.out is not None else _READ)

    def _frame_error(self, conn: _Conn, data: Any, pos: int) -> None:
        try:
            wire.frame_size(data, self._limit, pos)
        except wire.FrameError as exc:
            self._drop(conn, str(exc))
            return
        raise AssertionError("frame_size accepted a size the server refused")

    def _drop(self, conn: _Conn, reason: str) -> None:
        log.warning("dropped: connection from %s: %s", conn.peer, reason)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._admission.release(conn, conn.listener)
        if conn.events and self._selector is not None:
            with contextlib.suppress(ValueError, OSError):
                self._selector.unregister(conn.sock.fileno())
            self._fds.pop(conn.sock.fileno(), None)
            conn.events = 0
        self._connections.pop(conn.sock.fileno(), None)
        self._paused.pop(conn, None)
        self._buffered.pop(conn, None)
        self._release_buffer(conn)
        conn.out = None
        conn.sock.close()

    # --- sending ---------------------------------------------------------------------------

    def _send_small(self, conn: _Conn, payload: bytes) -> None:
        """A handshake frame; a peer that cannot take a few bytes is gone."""
        if not self._send(conn, [payload]):
            self._close(conn)

    def _send(self, conn: _Conn, parts: bytes | list[wire.Buffer]) -> bool:
        """Send one frame (bytes: framed already) as far as the socket takes it, keeping the
        rest in ``conn.out``.

        False when the peer is gone.
        """
        if isinstance(parts, bytes):
            return self._send_frame(conn, parts)
        size = sum(map(len, parts))
        if size > self._limit:
            try:
                wire.frame_header(size, self._limit)
            except wire.FrameError as exc:
                parts = wire.encode_error(ValueError(f"the reply is too big: {exc}"))
                size = sum(map(len, parts))
        if size <= _SMALL_SEND:
            return self._send_frame(conn, _pack_header(size) + b"".join(parts))
        conn.out = [memoryview(_pack_header(size))] + [memoryview(p).cast("B") for p in parts]
        return self._push(conn)

    def _send_frame(self, conn: _Conn, data: bytes) -> bool:
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.debug("closed: connection from %s: %s", conn.peer, _why(exc))
            return False
        if sent < len(data):
            conn.out = [memoryview(data)[sent:]]
        return True

    def _push(self, conn: _Conn) -> bool:
        views = conn.out
        assert views is not None
        sendmsg = conn.sock.sendmsg
        while views:
            try:
                sent = sendmsg(views[:_MAX_IOV])
            except BlockingIOError:
                return True
            except OSError as exc:
                log.debug("closed: connection from %s: %s", conn.peer, _why(exc))
                conn.out = None
                return False
            while views and sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            if sent:
                views[0] = views[0][sent:]
        conn.out = None
        return True

    def _flush(self, conn: _Conn, generation: int) -> None:
        if conn.out is not None and not self._push(conn):
            self._close(conn)
            return
        if conn.out is None:
            if conn.handshake is not None:
                if conn.securing:
                    self._secure(conn)  # the TLS handshake waited to write
                    return
                self._set_events(conn, _READ)
                return
            self._set_events(conn, _READ)
            if conn.buf is not None:
                self._process_buffer(conn, generation)

    # --- slow calls ------------------------------------------------------------------------

    def _watch(self) -> None:
        """Hand the I/O loop to a new thread when a call runs longer than ``inline_limit``."""
        last = None
        quiet = 0
        while not self._done.is_set():
            calling = self._calling
            if calling is None:
                quiet += 1
                if quiet >= _PARK_AFTER:  # no calls for a while: sleep until the next one
                    self._watch_parked = True
                    if self._calling is None and not self._stopping:
                        self._watch_event.wait()
                    self._watch_event.clear()
                    self._watch_parked = False
                    quiet = 0
                    last = None
                    continue
            else:
                quiet = 0
                # the same call two ticks in a row is slow; handing the loop over pays off only
                # when someone waits for it (a busy machine can make any call look slow)
                if calling is last and self._anyone_waiting():
                    self._promote(calling)
            last = calling
            time.sleep(self._inline_limit)

    def _anyone_waiting(self) -> bool:
        """Whether a descriptor of the loop is ready: a request, a peer, or a wakeup waits."""
        try:
            assert self._selector is not None
            # level-triggered: nothing is consumed; TLS may hold a request epoll cannot see
            return bool(self._selector.poll(0, 1)) or bool(self._buffered)
        except (OSError, ValueError):  # closed by a stop in the meantime
            return False

    def _promote(self, calling: list[_Conn]) -> None:
        with self._lock:
            if self._done.is_set():
                return
            try:
                conn = calling.pop()
            except IndexError:
                return  # it returned in the meantime
            conn.busy = True
            self._generation += 1
            generation = self._generation
            self.handoffs += 1
            spare, self._spare = self._spare, None
            if spare is not None:
                spare.append(generation)
                self._spare_ready.notify_all()
        log.debug("handed over: the I/O loop (a call from %s is slow)", conn.peer)
        if spare is None:
            self._spawn_loop(generation)

    def _await_loop(self) -> int | None:
        """After its slow call, a thread waits to run the loop again, unless one already waits.

        So a handover costs a wakeup, not a new thread, and threads do not pile up.
        """
        with self._lock:
            if self._spare is not None or self._done.is_set():
                return None
            slot: list[Any] = []
            self._spare = slot
            while not slot and not self._done.is_set():
                self._spare_ready.wait()
            if self._spare is slot:
                self._spare = None
            return slot[0] if slot else None

    # --- calls -----------------------------------------------------------------------------

    def _dispatch(self, request: memoryview, caller: str = "") -> bytes | list[wire.Buffer]:
        """The reply to one request: a whole frame (bytes), or the parts of its payload; each
        call is counted when metrics are on (two clock reads and two C calls: the skill's name
        is dotted, its series looked up, its bucket found later, when the records are folded)."""
        hook = self._hook
        if hook is None:
            return self._call(request, caller)[0]
        count_start, record, metrics = hook
        if not count_start() % FOLD_EVERY:
            metrics.fold(wait=False)  # bounds the queue when nothing else folds it
        started = _clock()
        reply, path, error = self._call(request, caller)
        elapsed = _clock() - started
        if error is not None and error == "PermissionError":
            path = None  # refused: counted as unresolved, never a label of its own
        sent = len(reply) if isinstance(reply, bytes) else sum(map(len, reply))
        who = self._fixed_caller or caller or ROOT
        record((path, who, elapsed, error, len(request), sent, True))
        return reply

    def _call(
        self, request: memoryview, caller: str = ""
    ) -> tuple[bytes | list[wire.Buffer], tuple[str, ...] | None, str | None]:
        """(the reply, the path called or None if undecodable, the error's type name or None)."""
        key = bytes(request) if len(request) <= _PLAIN_CALL_MAX else None
        path = self._plain_calls.get(key) if key is not None else None
        if path is not None:
            args, kwargs = (), None  # a plain call of a path checked when it was kept
        else:
            try:
                path, args, kwargs = wire.decode_request(request)
            except Exception as exc:
                exc.add_note("raised in the AIGIS core while decoding the request")
                return self._error(exc), None, type(exc).__name__
            try:
                if path not in self._allowed:  # may raise: a name may be unhashable
                    self._check(path)
            except Exception as exc:
                return self._error(exc), path, type(exc).__name__
            if key is not None and not args and not kwargs and key == wire.plain_call(path):
                if len(self._plain_calls) >= _ALLOWED_CACHE:
                    self._plain_calls.clear()
                self._plain_calls[key] = path  # from now on looked up, not unpickled
        try:
            if self._authorize is not None:
                self._authorize(path, caller)
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
            return self._error(exc), path, type(exc).__name__
        if value is None:
            return _NONE_FRAME, path, None
        try:
            return wire.reply_frame(value, self._limit), path, None
        except Exception as exc:
            error = TypeError(
                f"{wire.dotted(path)} returned {type(value).__qualname__}, which cannot be "
                f"sent to a plugin: {exc}"
            )
            error.__cause__ = exc
            return self._error(error), path, "TypeError"

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


def _grow_send_buffer(sock: socket.socket) -> None:
    """Ask for a send buffer of _UNIX_SEND_BUFFER: past net.core.wmem_max when permitted (root,
    CAP_NET_ADMIN), else as far as it allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _UNIX_SEND_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SEND_BUFFER)


_PEERCRED = struct.Struct("3i")


def _identify(sock: socket.socket, address: Any) -> tuple[str, object]:
    """How to name the peer in logs, and who it is for the per-peer budget (uid, or host)."""
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, _gid = _PEERCRED.unpack(creds)
            return f"pid {pid} uid {uid}", ("uid", uid)
        except (OSError, AttributeError):
            return "unix socket peer", ("uid", None)
    host, port = address[:2]
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), ("host", host)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
