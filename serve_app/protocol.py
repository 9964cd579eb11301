"""The `/api/chat` wire protocol: pure encode/decode of websocket messages.

Every message is binary and its first byte is the kind; the rest is the payload. The kinds
and their payloads match Moshi's `/api/chat`, so Moshi's own clients talk to this server
unchanged (they throw on kinds they do not know and on control bytes outside 0–3, so this
module refuses to build anything else).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Kind(IntEnum):
    HANDSHAKE = 0x00  # server → client: the session is ready
    AUDIO = 0x01  # Ogg/Opus pages (default) or PCM16LE (``?codec=pcm16``), 24 kHz mono
    TEXT = 0x02  # UTF-8 piece of the model's transcript
    CONTROL = 0x03  # one control byte (see ``Control``)
    METADATA = 0x04  # UTF-8 JSON: state changes, interrupts, stats
    ERROR = 0x05  # UTF-8 message; the session goes on
    PING = 0x06  # keep-alive, no payload


class Control(IntEnum):
    START = 0x00
    END_TURN = 0x01  # client: "I have finished speaking" (push-to-talk, skips the VAD wait)
    PAUSE = 0x02
    RESTART = 0x03  # client: forget the conversation so far


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text is sent back as a 0x05."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    payload: bytes


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes([Kind(kind)]) + payload


def decode(message: bytes | bytearray | memoryview | str) -> Message:
    """A received websocket message → ``Message``; ``ProtocolError`` when it is not one."""
    if isinstance(message, str):
        raise ProtocolError("text frames are not part of the protocol; send binary messages")
    data = bytes(message)
    if not data:
        raise ProtocolError("empty message (the first byte must be the kind)")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError(f"unknown message kind 0x{data[0]:02x}") from None
    return Message(kind, data[1:])


# -- builders (server → client) ----------------------------------------------------------
def handshake() -> bytes:
    return encode(Kind.HANDSHAKE)


def audio(payload: bytes) -> bytes:
    return encode(Kind.AUDIO, payload)


def text(piece: str) -> bytes:
    return encode(Kind.TEXT, piece.encode("utf-8"))


def metadata(obj: dict[str, Any]) -> bytes:
    return encode(Kind.METADATA, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def error(message: str) -> bytes:
    return encode(Kind.ERROR, message.encode("utf-8"))


def ping() -> bytes:
    return encode(Kind.PING)


def control(code: Control) -> bytes:
    return encode(Kind.CONTROL, bytes([Control(code)]))


# -- payload readers (client → server) ---------------------------------------------------
def read_control(payload: bytes) -> Control:
    if len(payload) != 1:
        raise ProtocolError(f"control payload must be one byte, got {len(payload)}")
    try:
        return Control(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown control byte 0x{payload[0]:02x} (expected 0–3)") from None


def read_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"text payload is not UTF-8: {exc}") from None


def read_metadata(payload: bytes) -> dict[str, Any]:
    """A JSON object; ``ProtocolError`` for anything else, deep nesting included (the
    parser recurses, so ``[[[[…`` would otherwise escape as ``RecursionError``)."""
    try:
        obj = json.loads(read_text(payload))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"metadata payload is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("metadata payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("metadata payload must be a JSON object")
    return obj
