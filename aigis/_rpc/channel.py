"""One framed socket: multiprocess.connection's framing, zero-copy sends, a reused buffer."""

from __future__ import annotations

import socket

from aigis._rpc import wire

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

_INITIAL_BUFFER = 64 * 1024
_KEEP_BUFFER = 16 * 1024 * 1024  # reuse receive buffers up to this size; fresh pages are slow
_SMALL_SEND = 64 * 1024
_MAX_IOV = 512  # below IOV_MAX (1024)
_pack_header = wire.HEADER.pack
_unpack_header = wire.HEADER.unpack_from


class TruncatedFrame(EOFError):
    """The peer closed the connection in the middle of a frame."""


class Channel:
    """One framed socket: multiprocess.connection's framing, zero-copy sends, a reused buffer.

    ``send_bytes``/``recv_bytes`` make it usable by multiprocess's authentication handshake.
    """

    def __init__(self, sock: socket.socket, *, limit: int = wire.MAX_MESSAGE) -> None:
        self.sock = sock
        self.limit = limit
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0

    def send_message(self, parts: Sequence[wire.Buffer]) -> None:
        """Send one frame made of ``parts``; raises FrameError, sending nothing, when too big."""
        size = sum(map(len, parts))
        if size <= _SMALL_SEND and size <= self.limit:
            self.sock.sendall(_pack_header(size) + b"".join(parts))
        else:
            self._send_all([wire.frame_header(size, self.limit), *parts])

    def send_frame(self, frame: bytes) -> None:
        """Send one frame, header included."""
        self.sock.sendall(frame)

    def _send_all(self, buffers: list[Any]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            sent = self.sock.sendmsg(views[:_MAX_IOV])
            while views and sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            if sent:
                views[0] = views[0][sent:]

    def recv_message(self, limit: int | None = None) -> memoryview:
        """The next frame's payload (at most ``limit`` bytes, by default the channel's), valid
        until the next receive.

        EOFError when the peer closed between frames, TruncatedFrame inside one.
        """
        if limit is None:
            limit = self.limit
        start, end = self._start, self._end
        if start == end:
            # the usual case (request/reply): nothing buffered, one recv gets a small frame
            if len(self._buf) > _KEEP_BUFFER:
                self._set_buffer(bytearray(_INITIAL_BUFFER))
            end = self.sock.recv_into(self._view)
            if not end:
                raise EOFError("connection closed")
            start, self._start, self._end = 0, 0, end
        if end - start < 4:
            self._fill(4)
            start, end = self._start, self._end
        size = _unpack_header(self._buf, start)[0]
        if not 0 <= size <= limit:
            wire.frame_size(self._buf, limit, start)  # raises FrameError, saying why
        start += 4
        if end - start < size:
            self._start = start
            self._fill(size)
            start = self._start
        self._start = start + size
        return self._view[start : start + size]

    def _set_buffer(self, buf: bytearray) -> None:
        self._buf = buf
        self._view = memoryview(buf)

    def _fill(self, need: int) -> None:
        have = self._end - self._start
        if have >= need:
            return
        if self._start + need > len(self._buf):
            if need + 4 > len(self._buf):
                # room for the header too: the next frame this big lands in place, unmoved
                buf = bytearray(max(need + 4, 2 * len(self._buf)))
                buf[:have] = self._view[self._start : self._end]
                self._set_buffer(buf)
            else:
                self._buf[:have] = self._buf[self._start : self._end]
            self._start, self._end = 0, have
        view = self._view
        recv_into = self.sock.recv_into
        while self._end - self._start < need:
            got = recv_into(view[self._end :])
            if not got:
                raise TruncatedFrame("connection closed in the middle of a message")
            self._end += got

    def peer_closed(self) -> bool:
        """Whether the idle peer has closed (or broke protocol by talking unasked)."""
        if self._end != self._start:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    # multiprocess.connection.Connection API, as used by answer_challenge/deliver_challenge
    def send_bytes(self, buf: wire.Buffer) -> None:
        """Send one frame (multiprocess API)."""
        self.send_message((buf,))

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one frame of at most ``maxlength`` bytes (multiprocess API)."""
        limit = self.limit if maxlength is None else min(maxlength, self.limit)
        return bytes(self.recv_message(limit))

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
