"""multiprocess's HMAC challenge, both sides, over frame payloads.

Pure: no sockets, so one I/O thread can run many handshakes at once. The byte exchange is that
of ``multiprocess.connection.deliver_challenge`` followed by ``answer_challenge`` (the core's
side) and the reverse (the plugin's side), so a multiprocess ``Client`` authenticates unchanged;
multiprocess itself is not imported (it pulls in dill: ~35 ms and ~6 MiB in every process).
Handshake frames are raw bytes capped at ``MAX_FRAME``: nothing here is unpickled.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import Protocol

# the bytes of multiprocess.connection (a test checks they still agree)
MESSAGE_LENGTH = 20
CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MAX_FRAME = 256  # what multiprocess accepts for a handshake frame
HANDSHAKE_TIMEOUT = 5.0  # seconds a handshake may take: the core drops a slower peer, a plugin
#                         gives up that attempt (and retries within its window)


class AuthenticationError(Exception):
    """The other side rejected our key, or could not prove it holds it."""


class Refused(Exception):
    """The peer failed the handshake; ``reply`` (if any) is sent before closing."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


def _digest(authkey: bytes, message: bytes) -> bytes:
    return hmac.new(authkey, message, "md5").digest()


class ServerHandshake:
    """Challenge the peer, then answer its challenge; ``done`` once both sides are proven.

    ``authkey`` is one key, or ``{identity: key}``: the peer proves it holds one of them, and
    ``identity`` says which (each plugin holds a key of its own)."""

    __slots__ = ("_authkey", "_keys", "_nonce", "_state", "identity")

    def __init__(self, authkey: bytes | Mapping[str, bytes], nonce: bytes | None = None) -> None:
        self._keys = {"": authkey} if isinstance(authkey, bytes) else dict(authkey)
        self._authkey = b""
        self.identity: str | None = None
        self._nonce = os.urandom(MESSAGE_LENGTH) if nonce is None else nonce
        self._state = "digest"

    @property
    def done(self) -> bool:
        """Whether the peer has proven it holds the key and accepted our proof."""
        return self._state == "done"

    def challenge(self) -> bytes:
        """The first payload to send."""
        return CHALLENGE + self._nonce

    def feed(self, payload: bytes) -> bytes | None:
        """The payload to send in answer to the peer's ``payload`` (None: nothing to send).

        Raises Refused, saying why, when the peer fails.
        """
        state = self._state
        if state == "digest":
            for identity, key in self._keys.items():  # every key is tried: no early exit
                if hmac.compare_digest(payload, _digest(key, self._nonce)):
                    self.identity, self._authkey = identity, key
            if self.identity is None:
                raise Refused("bad authkey", FAILURE)
            self._keys = {}
            self._state = "challenge"
            return WELCOME
        if state == "challenge":
            digest = answer(self._authkey, payload)
            self._state = "welcome"
            return digest
        if state == "welcome":
            if payload != WELCOME:
                raise Refused("bad authkey (our digest was rejected)")
            self._state = "done"
            return None
        raise Refused("bad handshake (talked after it was over)")


class FrameConnection(Protocol):
    """What the plugin's side needs of a connection: one frame out, one frame in."""

    def send_bytes(self, buf: bytes) -> None: ...

    def recv_bytes(self, maxlength: int | None = None) -> bytes: ...


def answer(authkey: bytes, payload: bytes) -> bytes:
    """Our digest in answer to the peer's challenge ``payload``; Refused when it is none."""
    if not payload.startswith(CHALLENGE):
        raise Refused("bad handshake (expected a challenge)")
    return _digest(authkey, payload[len(CHALLENGE) :])


def authenticate(conn: FrameConnection, authkey: bytes, nonce: bytes | None = None) -> None:
    """The plugin's side over a blocking ``conn``: answer the core's challenge, then challenge it
    (multiprocess's ``answer_challenge`` then ``deliver_challenge``).

    Raises AuthenticationError when either key proof fails, Refused on a foreign protocol."""
    conn.send_bytes(answer(authkey, conn.recv_bytes(MAX_FRAME)))
    if conn.recv_bytes(MAX_FRAME) != WELCOME:
        raise AuthenticationError("digest sent was rejected")
    nonce = os.urandom(MESSAGE_LENGTH) if nonce is None else nonce
    conn.send_bytes(CHALLENGE + nonce)
    if not hmac.compare_digest(conn.recv_bytes(MAX_FRAME), _digest(authkey, nonce)):
        conn.send_bytes(FAILURE)
        raise AuthenticationError("digest received was wrong")
    conn.send_bytes(WELCOME)
