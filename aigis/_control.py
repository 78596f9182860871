"""The operators' API behind ``aigisctl``, served on the control socket (never on TCP).

Requests and replies are plain JSON (``aigis._ctlwire``): an operator can check, start, stop,
reload and call skills with literal arguments, but can never make the core unpickle anything.
Every peer costs a bounded number of threads and log lines, authenticated or not.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import pprint
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aigis import _ctlwire as wire
from aigis._errors import AigisError, PluginError
from aigis._metrics import OPERATOR, UNRESOLVED, Metrics
from aigis._redact import redact
from aigis._rpc.handshake import HANDSHAKE_TIMEOUT
from aigis._rpc.wire import refusal

if TYPE_CHECKING:  # pragma: no cover
    from aigis._daemon import Daemon

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660  # the core's group (aigis) may connect
MAX_CONNECTIONS = 32  # at once, authenticated or not
MAX_PER_PEER = 8  # at once per peer uid: one user cannot take every slot
MAX_RESULT = 1 << 20  # characters of a skill result's repr sent back to aigisctl
LOG_EVERY = 10.0  # seconds between two lines about refused connections


def parse_call_args(tokens: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """Python literals; a token that is not one is a string; ``NAME=VALUE`` is a keyword."""

    def value(text: str) -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return text

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for token in tokens:
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", token, re.S)
        if match:
            kwargs[match.group(1)] = value(match.group(2))
        else:
            args.append(value(token))
    return args, kwargs


class Control:
    """The operations (an allowlist), each taking and returning plain data."""

    OPERATIONS = (
        "ping", "status", "start", "stop", "restart", "reload", "skills", "logs", "call", "top",
    )  # fmt: skip
    #: Operations that may take long (stopping, reloading, a slow skill): the client waits.
    SLOW = frozenset({"start", "stop", "restart", "reload", "call"})

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def run(self, op: str, args: list[Any]) -> Any:
        """``op(*args)``; AttributeError for an unknown operation, TypeError for bad arguments."""
        if op not in self.OPERATIONS:
            raise AttributeError(
                f"no control operation {op!r}; known: {', '.join(self.OPERATIONS)}"
            )
        method: Callable[..., Any] = getattr(self, op)
        return method(*args)

    def ping(self) -> dict[str, Any]:
        """Version, pid and supervisor of the running core."""
        return self.daemon.describe()

    def status(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Status rows for ``names`` (all plugins when empty), in load order."""
        if names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            raise TypeError("status takes a list of plugin names")
        return self.daemon.status_rows(names or None, usage=True)

    def _known(self, name: object) -> str:
        if not isinstance(name, str) or name not in self.daemon.plugins:
            raise PluginError(str(name), f"no such plugin in {self.daemon.config.path}")
        return name

    def start(self, name: str) -> dict[str, Any]:
        """Start a stopped, exited or failed plugin (re-loading it if it failed to load)."""
        return self.daemon.start_plugin(self._known(name))

    def stop(self, name: str) -> dict[str, Any]:
        """Stop a plugin's process (core plugins cannot be stopped, only reloaded)."""
        return self.daemon.stop_plugin(self._known(name))

    def restart(self, name: str) -> dict[str, Any]:
        """Stop then start; resets the restart count."""
        return self.daemon.restart_plugin(self._known(name))

    def reload(self) -> str:
        """Re-read the config and apply the differences; returns the plan's summary."""
        return self.daemon.reload_config()

    def skills(self) -> list[dict[str, str]]:
        """Every registered skill: path, kind, owning plugin."""
        return [
            {"path": f"aigis.{s.path}", "kind": s.kind, "plugin": s.plugin}
            for s in self.daemon.namespace.skills()
        ]

    def logs(self, name: str) -> dict[str, Any]:
        """Where ``name``'s output is: ``{"file": path}`` or ``{"journal": unit}`` (with
        ``"ssh"``: the command line reaching its remote host)."""
        where = self.daemon.log_location(self._known(name))
        if where.journal_unit is not None and where.ssh is not None:
            return {"journal": where.journal_unit, "ssh": list(where.ssh)}
        if where.journal_unit is not None:
            return {"journal": where.journal_unit}
        return {"file": str(where.file)}

    def call(self, path: str, tokens: list[str]) -> str:
        """Call skill ``path`` with arguments given as literals; its result's ``repr``."""
        if not isinstance(path, str) or not isinstance(tokens, list):
            raise TypeError("call takes a skill path and a list of argument strings")
        names = tuple(path.removeprefix("aigis.").split("."))
        why = refusal(names)
        if why is not None:
            raise PermissionError(why)
        tokens = [str(t) for t in tokens]
        args, kwargs = parse_call_args(tokens)
        metrics: Metrics = self.daemon.metrics
        skill, error, text = ".".join(names), None, ""
        metrics.call_started()
        began = time.perf_counter()
        try:
            try:
                target = self.daemon.namespace.resolve(names)
            except Exception:
                skill = UNRESOLVED  # a mistyped path must not become a label of its own
                raise
            result = target(*args, **kwargs) if callable(target) else target
            text = pprint.pformat(result)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            metrics.observe_call(
                skill,
                OPERATOR,
                time.perf_counter() - began,
                error,
                bytes_in=len(path) + sum(len(t) for t in tokens),
                bytes_out=len(text),
            )
        if len(text) > MAX_RESULT:
            text = text[:MAX_RESULT] + f"... ({len(text)} characters, cut)"
        return text

    def top(self) -> dict[str, Any]:
        """What ``aigisctl top`` shows: plugins with usage, skills, call metrics, the core."""
        return self.daemon.view()


class _Peer:
    """One accepted connection: who it is and whether it has authenticated yet."""

    def __init__(self, sock: socket.socket, uid: int | None, pid: int | None) -> None:
        self.sock, self.uid, self.pid = sock, uid, pid
        self.pending = True
        self.accepted = time.monotonic()

    def __str__(self) -> str:
        return f"uid {self.uid} pid {self.pid}" if self.uid is not None else "unknown peer"

    def evict(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ControlServer:
    """Serves ``Control`` on a Unix socket: a thread per connection, at most MAX_CONNECTIONS."""

    def __init__(
        self, control: Control, path: Path, key: bytes, metrics: Metrics | None = None
    ) -> None:
        self.control, self.path, self._key = control, Path(path), key
        self.metrics = metrics if metrics is not None else Metrics()
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._peers: list[_Peer] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._refused = 0
        self._logged_at = -LOG_EVERY
        self._accepter: threading.Thread | None = None

    def start(self) -> None:
        """Bind (replacing a stale socket file), listen, accept in a background thread."""
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.path))
            os.chmod(self.path, SOCKET_MODE)  # before listen(): nobody connects in between
            self._inode = os.stat(self.path).st_ino
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise AigisError(f"cannot listen on unix socket {self.path}: {exc.strerror}") from None
        self._listener = sock
        self._accepter = threading.Thread(target=self._accept, name="aigis-control", daemon=True)
        self._accepter.start()
        log.info("listening: unix:%s (control)", self.path)

    def stop(self) -> None:
        """Stop accepting, close idle connections, unlink the socket file if it is ours."""
        with self._lock:
            if self._stopping or self._listener is None:
                return
            self._stopping = True
            peers = list(self._peers)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._accepter is not None:
            self._accepter.join()
        for peer in peers:
            if peer.pending:
                peer.evict()
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)  # only ours: a newer core may have replaced it

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise AigisError(
                f"cannot listen on unix socket {self.path}: it exists and is not a socket"
            )
        # The instance lock is held: whatever socket file is here, no live core owns it.
        self.path.unlink()
        log.info("removed: stale socket %s", self.path)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            peer = _Peer(sock, *_credentials(sock))
            if not self._admit(peer):
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(peer,), name="aigis-control-conn",
                             daemon=True).start()  # fmt: skip

    def _admit(self, peer: _Peer) -> bool:
        """Room for ``peer``? The oldest unauthenticated connection makes room if needed."""
        with self._lock:
            if self._stopping:
                return False
            same = [p for p in self._peers if p.uid == peer.uid]
            crowded = len(same) >= MAX_PER_PEER or len(self._peers) >= MAX_CONNECTIONS
            if crowded:
                pool = same if len(same) >= MAX_PER_PEER else self._peers
                pending = [p for p in pool if p.pending]
                if not pending:
                    self._refuse(peer, "too many connections")
                    return False
                oldest = min(pending, key=lambda p: p.accepted)
                self._peers.remove(oldest)
                self.metrics.connection_closed("control")
                oldest.evict()
                self._refuse(oldest, "evicted: unauthenticated while the socket is crowded")
            self._peers.append(peer)
            self.metrics.connection_opened("control")
            return True

    def _refuse(self, peer: _Peer, why: str) -> None:
        """At most one line every LOG_EVERY seconds, with the count since the last one."""
        self.metrics.handshake_refused("control")
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            log.warning("refused: control connection from %s: %s (%d refused)", peer, why,
                        self._refused)  # fmt: skip
            self._logged_at, self._refused = now, 0

    def _serve(self, peer: _Peer) -> None:
        try:
            self._exchange(peer)
        except Exception:  # a bug must not kill the accept loop's peers; one line per peer
            log.exception("failed: control connection from %s", peer)
        finally:
            with self._lock:
                if peer in self._peers:
                    self._peers.remove(peer)
                    self.metrics.connection_closed("control")
            peer.sock.close()

    def _exchange(self, peer: _Peer) -> None:
        sock = peer.sock
        nonce = os.urandom(wire.NONCE_BYTES)
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.sendall(wire.encode({"aigis": wire.PROTOCOL, "nonce": nonce.hex()}))
            request = _read(sock, deadline)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._refuse(peer, f"bad request ({exc.__class__.__name__})")
            return
        if not wire.verify(self._key, nonce, request.get("proof")):
            with self._lock:
                self._refuse(peer, "bad control key")
            _send(
                sock, {"ok": False, "error": "Denied", "message": "the control key does not match"}
            )
            return
        peer.pending = False
        op, args = request.get("op"), request.get("args", [])
        if not isinstance(op, str) or not isinstance(args, list):
            _send(sock, {"ok": False, "error": "TypeError", "message": "malformed request"})
            return
        if op in Control.SLOW:
            log.info("requested: %s %s by %s", op, " ".join(map(str, args))[:200], peer)
        sock.settimeout(None)
        try:
            reply = {"ok": True, "value": self.control.run(op, args)}
        except Exception as exc:  # the operation's own error: its type and message, one line
            reply = {"ok": False, "error": type(exc).__name__, "message": redact(str(exc))}
        _send(sock, reply)


def _credentials(sock: socket.socket) -> tuple[int | None, int | None]:
    """(uid, pid) of the peer process, from the kernel (SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return uid, pid


def _read(sock: socket.socket, deadline: float) -> dict[str, Any]:
    header = _exactly(sock, wire.HEADER.size, deadline)
    return wire.decode(_exactly(sock, wire.frame_size(header, wire.MAX_REQUEST), deadline))


def _exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not complete in time")
        sock.settimeout(remaining)
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            raise ConnectionResetError("closed before the request was complete")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send(sock: socket.socket, reply: dict[str, Any]) -> None:
    try:
        data = wire.encode(reply)
    except (ValueError, TypeError) as exc:  # e.g. a value JSON cannot carry, or far too big
        data = wire.encode({"ok": False, "error": type(exc).__name__, "message": str(exc)})
    with contextlib.suppress(OSError):
        sock.sendall(data)
