"""The core's side of multiprocess's HMAC challenge, as a state machine over frame payloads.

Pure: no sockets, so one I/O thread can run many handshakes at once. The byte exchange is that
of ``multiprocess.connection.deliver_challenge`` followed by ``answer_challenge``, so a
multiprocess ``Client`` (and the plugin side, which uses those functions) authenticates
unchanged. Handshake frames are raw bytes capped at ``MAX_FRAME``: nothing here is unpickled.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from multiprocess.connection import CHALLENGE, FAILURE, MESSAGE_LENGTH, WELCOME

MAX_FRAME = 256  # what multiprocess accepts for a handshake frame


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
            if not payload.startswith(CHALLENGE):
                raise Refused("bad handshake (expected a challenge)")
            self._state = "welcome"
            return _digest(self._authkey, payload[len(CHALLENGE) :])
        if state == "welcome":
            if payload != WELCOME:
                raise Refused("bad authkey (our digest was rejected)")
            self._state = "done"
            return None
        raise Refused("bad handshake (talked after it was over)")
