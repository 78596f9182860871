"""The optional HTTP listener (``[aigis] http``): ``/metrics`` for Prometheus and the read-only
status page. GET only; a bounded number of connections and threads; every request needs the
bearer token when ``http_token_file`` is set (HTTP Basic with the token as password works too,
so a browser can log in)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aigis._errors import AigisError
from aigis._metrics import Metrics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # served at once; more are closed at once
REQUEST_TIMEOUT = 10.0  # seconds a peer may take to send its request
MAX_TOKEN = 4096  # bytes of a token file
LOG_EVERY = 10.0  # seconds between two lines about refused requests
LISTENER = "http"

Route = tuple[str, Callable[[], bytes]]  # (content type, body maker)


def read_token(path: Path) -> bytes:
    """The bearer token: the file's first line, which must not be empty."""
    try:
        data = Path(path).read_bytes()[: MAX_TOKEN + 1]
    except OSError as exc:
        raise AigisError(f"cannot read http_token_file {path}: {exc.strerror}") from None
    token = data.strip().split(b"\n")[0].strip() if data.strip() else b""
    if not token or len(data) > MAX_TOKEN:
        raise AigisError(f"http_token_file {path}: expected one line with a token (<= 4 KiB)")
    return token


def authorized(header: str | None, token: bytes | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always True without a token):
    ``Bearer TOKEN``, or ``Basic`` with TOKEN as the password (any user name). Pure."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        given = value.encode()
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        given = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(given, token)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], owner: HttpServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # No getfqdn() (HTTPServer.server_bind does one: a DNS lookup at start-up).
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = "aigis", self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.owner.refuse("too many connections")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        metrics = self.owner.metrics
        metrics.connection_opened(LISTENER)
        try:
            super().process_request_thread(request, client_address)
        finally:
            metrics.connection_closed(LISTENER)
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "aigis"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        owner = self.server.owner
        if not authorized(self.headers.get("Authorization"), owner.token):
            owner.refuse(f"no valid token from {self.client_address[0]}")
            self._send(401, "text/plain; charset=utf-8", b"a bearer token is required\n", body,
                       {"WWW-Authenticate": 'Basic realm="AIGIS", charset="UTF-8"'})  # fmt: skip
            return
        route = owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(404, "text/plain; charset=utf-8", b"not found\n", body)
            return
        content_type, make = route
        try:
            data = make()
        except Exception:  # a bug in one view must not kill the listener; one line
            log.exception("failed: http %s", self.path[:100])
            self._send(500, "text/plain; charset=utf-8", b"internal error\n", body)
            return
        self._send(200, content_type, data, body)

    def _send(
        self,
        code: int,
        content_type: str,
        data: bytes,
        body: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(data)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
            "style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
            **(extra or {}),
        }
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            with contextlib.suppress(OSError):
                self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Bad request lines, unsupported methods: a short plain answer, nothing echoed back.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._send(code, "text/plain; charset=utf-8", b"%d\n" % code, True)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s " + format, self.client_address[0], *args)


class HttpServer:
    """The listener: ``routes`` maps a path to (content type, body maker)."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[str, Route],
        metrics: Metrics,
        token: bytes | None = None,
    ) -> None:
        self.address = address
        self.routes = routes
        self.metrics = metrics
        self.token = token
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._refused = 0
        self._logged_at = -LOG_EVERY

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread."""
        try:
            self._server = _Server(self.address, self)
        except OSError as exc:
            host, port = self.address
            raise AigisError(f"cannot listen on http {host}:{port}: {exc.strerror}") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="aigis-http"
        )
        self._thread.daemon = True
        self._thread.start()
        bound = str(self._server.server_address[0])
        shown = f"[{bound}]" if ":" in bound else bound
        log.info("listening: http://%s:%d/ (status page, /metrics)", shown, self.port)

    def stop(self) -> None:
        """Stop serving; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refuse(self, why: str) -> None:
        """Count a refused request; at most one log line every LOG_EVERY seconds."""
        self.metrics.handshake_refused(LISTENER)
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY:
                log.warning("refused: http request: %s (%d refused)", why, self._refused)
                self._logged_at, self._refused = now, 0


def json_body(value: Any) -> bytes:
    """Compact JSON, as the page's script reads it."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
