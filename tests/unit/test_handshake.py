"""The server's side of multiprocess's challenge, against multiprocess's own client side."""

from __future__ import annotations

import hmac
import socket
import threading

import pytest
from multiprocess.connection import CHALLENGE, FAILURE, WELCOME, answer_challenge
from multiprocess.connection import deliver_challenge as client_challenge
from multiprocess.context import AuthenticationError

from aigis._rpc.channel import Channel
from aigis._rpc.handshake import Refused, ServerHandshake

KEY = b"k" * 32


def serve(chan: Channel, key: bytes) -> str:
    """Run ServerHandshake over a blocking channel, as the server's event loop would."""
    handshake = ServerHandshake(key)
    chan.send_bytes(handshake.challenge())
    try:
        while not handshake.done:
            reply = handshake.feed(chan.recv_bytes(256))
            if reply is not None:
                chan.send_bytes(reply)
    except Refused as refused:
        if refused.reply is not None:
            chan.send_bytes(refused.reply)
        return str(refused)
    return "ok"


@pytest.mark.parametrize("client_key, outcome", [(KEY, "ok"), (b"wrong", "bad authkey")])
def test_multiprocess_clients_authenticate_against_it(client_key, outcome):
    a, b = socket.socketpair()
    server, client = Channel(a), Channel(b)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(serve(server, KEY)))
    thread.start()
    try:
        answer_challenge(client, client_key)
        client_challenge(client, client_key)
        raised = None
    except AuthenticationError as exc:
        raised = exc
    thread.join(10)
    a.close()
    b.close()
    assert result == [outcome]
    assert (raised is None) == (outcome == "ok")


def test_each_step_checks_what_it_gets():
    handshake = ServerHandshake(KEY, nonce=b"n" * 20)
    assert handshake.challenge() == CHALLENGE + b"n" * 20
    good = hmac.new(KEY, b"n" * 20, "md5").digest()
    with pytest.raises(Refused, match="bad authkey") as info:
        ServerHandshake(KEY, nonce=b"n" * 20).feed(b"x" * 16)
    assert info.value.reply == FAILURE
    assert handshake.feed(good) == WELCOME
    confused = ServerHandshake(KEY, nonce=b"n" * 20)
    confused.feed(good)
    with pytest.raises(Refused, match="expected a challenge"):
        confused.feed(b"hello")
    assert handshake.feed(CHALLENGE + b"m" * 20) == hmac.new(KEY, b"m" * 20, "md5").digest()
    assert not handshake.done
    assert handshake.feed(WELCOME) is None
    assert handshake.done
    with pytest.raises(Refused, match="after it was over"):
        handshake.feed(b"more")
