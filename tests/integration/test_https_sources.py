"""Git over https with credentials from $AIGIS_GIT_CREDENTIALS, never from the URL: a real smart
HTTP server (git http-backend behind Basic auth) on loopback."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aigis._errors import SourceError
from aigis._sources import fetch, stored_credentials
from tests.unit.test_sources import Upstream

pytestmark = pytest.mark.integration

USER, TOKEN = "deploy", "t0k3n-s3cret"


class GitHandler(http.server.BaseHTTPRequestHandler):
    """Basic auth, then CGI to ``git http-backend`` (the smart protocol libgit2 speaks)."""

    root: Path
    seen: list[str]

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _serve(self) -> None:
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        good = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
        if auth != good:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": USER,
            "PATH": os.environ["PATH"],
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=30
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(": ")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    if shutil.which("git") is None:
        pytest.fail("git is needed (make test installs it)")
    upstream = Upstream(tmp_path / "srv" / "plug.git")
    upstream.commit("master", "one")
    handler = type("Handler", (GitHandler,), {"root": tmp_path / "srv", "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        # plain http on loopback: libgit2's https needs a CA; the credential path is the same
        yield f"http://127.0.0.1:{httpd.server_address[1]}/plug.git", handler.seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_credentials_come_from_the_store_file_not_the_url(server, tmp_path, monkeypatch, caplog):
    url, seen = server
    store = tmp_path / "git-credentials"
    host = url.split("/")[2]
    store.write_text(f"https://other:nope@{host}\nhttp://{USER}:{TOKEN}@{host}\n")
    store.chmod(0o600)
    monkeypatch.setenv("AIGIS_GIT_CREDENTIALS", str(store))
    caplog.set_level(logging.DEBUG)
    fetched = fetch("plug", url, tmp_path / "ext" / "plug", base_dir=tmp_path)
    assert (fetched.path / "VERSION").read_text() == "one"
    assert any(auth.startswith("Basic ") for auth in seen)
    assert TOKEN not in caplog.text


def test_without_credentials_the_error_says_how_to_give_them(server, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.delenv("AIGIS_GIT_CREDENTIALS", raising=False)
    with pytest.raises(SourceError) as caught:
        fetch("plug", url, tmp_path / "ext" / "plug", base_dir=tmp_path)
    assert "set $AIGIS_GIT_CREDENTIALS" in str(caught.value)
    assert not (tmp_path / "ext" / "plug").exists()


def test_wrong_credentials_are_offered_once_and_the_token_is_not_shown(
    server, tmp_path, monkeypatch
):
    url, seen = server
    store = tmp_path / "git-credentials"
    store.write_text(f"http://{USER}:wrong-{TOKEN}@{url.split('/')[2]}\n")
    monkeypatch.setenv("AIGIS_GIT_CREDENTIALS", str(store))
    with pytest.raises(SourceError) as caught:
        fetch("plug", url, tmp_path / "ext" / "plug", base_dir=tmp_path)
    assert "refused the credentials" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert len([a for a in seen if a.startswith("Basic ")]) == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://git.example/team/plug.git", ("team", "T2")),
        ("https://git.example/other/plug.git", ("host", "T1")),
        ("https://git.example:8443/team/plug.git", None),
        ("http://git.example/team/plug.git", None),
    ],
)
def test_the_longest_matching_entry_wins(url, expected):
    lines = ["https://host:T1@git.example", "https://team:T2@git.example/team/", "garbage"]
    assert stored_credentials(url, lines) == expected
