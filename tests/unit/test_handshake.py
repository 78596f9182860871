"""Both sides of multiprocess's challenge, each against multiprocess's own other side."""

from __future__ import annotations

import hmac
import socket
import threading

import multiprocess.connection as mp
import pytest
from multiprocess.connection import CHALLENGE, FAILURE, WELCOME, answer_challenge
from multiprocess.connection import deliver_challenge as client_challenge
from multiprocess.context import AuthenticationError

from aigis._rpc import handshake as ours
from aigis._rpc.channel import Channel
from aigis._rpc.handshake import Refused, ServerHandshake, authenticate

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


def test_the_bytes_are_multiprocess_s():
    got = (ours.MESSAGE_LENGTH, ours.CHALLENGE, ours.WELCOME, ours.FAILURE)
    assert got == (mp.MESSAGE_LENGTH, mp.CHALLENGE, mp.WELCOME, mp.FAILURE)


def mp_server(chan: Channel, key: bytes) -> str:
    """multiprocess's own server side (as its Listener runs it) over a blocking channel."""
    try:
        mp.deliver_challenge(chan, key)
        mp.answer_challenge(chan, key)
    except AuthenticationError as exc:
        return f"refused: {exc}"
    except EOFError:
        return "closed"
    return "ok"


@pytest.mark.parametrize(
    "server_key, outcome, error",
    [
        (KEY, "ok", None),
        (b"other", "refused: digest received was wrong", "digest sent was rejected"),
    ],
)
def test_the_plugin_side_authenticates_against_multiprocess(server_key, outcome, error):
    a, b = socket.socketpair()
    server, client = Channel(a), Channel(b)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(mp_server(server, server_key)))
    thread.start()
    try:
        authenticate(client, KEY)
        raised = None
    except ours.AuthenticationError as exc:
        raised = str(exc)
    b.close()
    thread.join(10)
    a.close()
    assert (result, raised) == ([outcome], error)


def test_the_plugin_side_refuses_a_core_that_cannot_prove_the_key():
    a, b = socket.socketpair()
    server, client = Channel(a), Channel(b)
    sent: list[bytes] = []

    def impostor() -> None:
        # answers our challenge with a wrong digest after accepting ours
        nonce = b"n" * 20
        server.send_bytes(CHALLENGE + nonce)
        server.recv_bytes(256)
        server.send_bytes(WELCOME)
        server.recv_bytes(256)
        server.send_bytes(b"x" * 16)
        sent.append(server.recv_bytes(256))

    thread = threading.Thread(target=impostor)
    thread.start()
    with pytest.raises(ours.AuthenticationError, match="digest received was wrong"):
        authenticate(client, KEY)
    thread.join(10)
    a.close()
    b.close()
    assert sent == [FAILURE]


def test_the_plugin_side_refuses_a_peer_that_does_not_challenge():
    a, b = socket.socketpair()
    Channel(a).send_bytes(b"hello")
    with pytest.raises(Refused, match="expected a challenge"):
        authenticate(Channel(b), KEY)
    a.close()
    b.close()
