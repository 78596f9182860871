"""The operators' wire (``aigisctl`` <-> the core): length-prefixed JSON frames and an HMAC
challenge. Plain data only — nothing here can carry code (pure, standard library only).

Exchange on ``<runtime_dir>/control.sock``, one request per connection:
  core -> ctl   {"aigis": PROTOCOL, "nonce": HEX}
  ctl  -> core  {"proof": HMAC(control key, nonce), "op": NAME, "args": [...]}
  core -> ctl   {"ok": true, "value": ...} | {"ok": false, "error": TYPE, "message": TEXT}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

PROTOCOL = 1
HEADER = struct.Struct("!I")
MAX_REQUEST = 1 << 20  # an operator's request is small: a peer cannot make the core buffer more
MAX_REPLY = 64 << 20
NONCE_BYTES = 32
CONTROL_KEY_NAME = "control.key"
_CONTEXT = b"aigis-control-v1:"


class WireError(ValueError):
    """A frame that is too big or not a JSON object."""


def control_key_path(state_dir: Path) -> Path:
    """``<state_dir>/control.key``: the operators' key, which plugins never receive."""
    return Path(state_dir) / CONTROL_KEY_NAME


def encode(message: dict[str, Any], limit: int = MAX_REPLY) -> bytes:
    """One frame: a 4-byte big-endian length, then the JSON text."""
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > limit:
        raise WireError(f"message of {len(body)} bytes exceeds the {limit}-byte limit")
    return HEADER.pack(len(body)) + body


def frame_size(header: bytes, limit: int) -> int:
    """The announced payload size, checked against ``limit`` before anything is buffered."""
    (size,) = HEADER.unpack(header)
    if size > limit:
        raise WireError(f"message of {size} bytes exceeds the {limit}-byte limit")
    return size


def decode(body: bytes) -> dict[str, Any]:
    """A frame's JSON object; WireError for anything else (never another exception)."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"not JSON: {exc.__class__.__name__}") from None
    if not isinstance(message, dict):
        raise WireError(f"expected a JSON object, got {type(message).__name__}")
    return message


def proof(key: bytes, nonce: bytes) -> str:
    """What the client sends to show it holds ``key``."""
    return hmac.new(key, _CONTEXT + nonce, hashlib.sha256).hexdigest()


def verify(key: bytes, nonce: bytes, claimed: object) -> bool:
    """Whether ``claimed`` is the proof for ``nonce`` (constant-time)."""
    return isinstance(claimed, str) and hmac.compare_digest(proof(key, nonce), claimed)
