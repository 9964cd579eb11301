"""Wire audio: the per-session format of the audio messages, Ogg/Opus (default) or raw
PCM16LE, 24 kHz mono. (The protocol's ``?codec=`` picks it; in this code "codec" means only
the neural codec of :mod:`voxtral.codec`.)

Incoming Ogg is split into pages and each page's CRC is checked *before* it reaches the Opus
decoder: sphn's stream reader keeps failing once it has swallowed a corrupt byte, so a
single bad message would otherwise end the session's audio. Header pages are kept so the
decoder can be rebuilt after a failure without the client re-sending them.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

log = logging.getLogger("ray.serve.voxtral")

SAMPLE_RATE = 24_000
OPUS_FRAMES = (1920, 960, 480, 240)  # 80/40/20/10 ms at 24 kHz: packet sizes used on the way out
MAX_PAGE_BYTES = 65_307  # 27 + 255 + 255 * 255: the largest page Ogg allows
WIRE_FORMATS = ("opus", "pcm16")  # the values of ``?codec=``


class AudioInputError(ValueError):
    """Audio from the client that cannot be decoded; sent back as a 0x05, session goes on."""


# -- Ogg pages ---------------------------------------------------------------------------
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, initial value 0)."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((crc >> 24) ^ b) & 0xFF]
    return crc


def page_length(buf: bytes | bytearray) -> int | None:
    """Length of the Ogg page at the start of ``buf``; None if more bytes are needed.
    Raises ``AudioInputError`` when ``buf`` does not start with a page header."""
    if len(buf) < 4:
        if bytes(buf) != b"OggS"[: len(buf)]:
            raise AudioInputError("audio is not an Ogg stream (no 'OggS' capture pattern)")
        return None
    if buf[:4] != b"OggS":
        raise AudioInputError("audio is not an Ogg stream (no 'OggS' capture pattern)")
    if len(buf) >= 5 and buf[4] != 0:
        raise AudioInputError(f"unsupported Ogg version {buf[4]}")
    if len(buf) < 27:
        return None
    n_segments = buf[26]
    if len(buf) < 27 + n_segments:
        return None
    return 27 + n_segments + sum(buf[27 : 27 + n_segments])


def check_page(page: bytes) -> None:
    """Raise ``AudioInputError`` when the page's CRC does not match its bytes."""
    stored = int.from_bytes(page[22:26], "little")
    if ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != stored:
        raise AudioInputError("corrupt Ogg page (CRC mismatch)")


class OggPages:
    """Bytes in any split → whole, CRC-checked pages. A corrupt page is dropped with an
    error and the stream resumes at the next message that starts with a page."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        if not self._buf and data and data[:4] != b"OggS"[: len(data[:4])]:
            raise AudioInputError("audio is not an Ogg stream (no 'OggS' capture pattern)")
        self._buf += data
        pages = []
        while self._buf:
            try:
                n = page_length(self._buf)
            except AudioInputError:
                self._buf.clear()
                raise
            if n is None:
                if len(self._buf) > MAX_PAGE_BYTES:
                    self._buf.clear()
                    raise AudioInputError("Ogg page larger than the format allows")
                break
            if len(self._buf) < n:
                break
            page = bytes(self._buf[:n])
            del self._buf[:n]
            try:
                check_page(page)
            except AudioInputError:
                self._buf.clear()
                raise
            pages.append(page)
        return pages


def is_bos(page: bytes) -> bool:
    """Beginning-of-stream page (carries OpusHead)."""
    return bool(page[5] & 0x02)


# -- wire formats ------------------------------------------------------------------------
class WireAudio(Protocol):
    """One session's wire audio, both ways."""

    name: str  # as the client names it in ``?codec=``

    def decode(self, payload: bytes) -> np.ndarray:
        """Wire payload → float32 samples at 24 kHz (possibly empty)."""
        ...

    def encode(self, pcm: np.ndarray) -> bytes:
        """Float samples at 24 kHz → wire payload (possibly empty while buffering)."""
        ...

    def flush(self) -> bytes:
        """Whatever is buffered, padded to a whole packet (end of a model turn)."""
        ...


class OpusWire:
    """Ogg/Opus at 24 kHz mono through sphn, one continuous stream each way per session."""

    name = "opus"

    def __init__(self) -> None:
        import sphn

        self._sphn = sphn
        self._pages = OggPages()
        self._headers: list[bytes] = []
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)

    def _reset_reader(self) -> None:
        self._reader = self._sphn.OpusStreamReader(SAMPLE_RATE)
        for page in self._headers:
            self._reader.append_bytes(page)

    def decode(self, payload: bytes) -> np.ndarray:
        out = []
        for page in self._pages.push(payload):
            if is_bos(page):  # a new logical stream (client restarted its encoder)
                self._headers = [page]
                self._reader = self._sphn.OpusStreamReader(SAMPLE_RATE)
            elif len(self._headers) == 1:
                self._headers.append(page)  # OpusTags
            try:
                pcm = self._reader.append_bytes(page)
            except Exception as exc:  # sphn raises ValueError/RuntimeError on bad packets
                self._reset_reader()
                log.info("undecodable Opus page: %s", exc)  # the library's words stay here
                raise AudioInputError("cannot decode Opus: corrupt or unsupported page") from None
            if pcm is not None and len(pcm):
                out.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def encode(self, pcm: np.ndarray) -> bytes:
        """Largest packets first, so any multiple of 10 ms leaves at once (nothing is held
        back waiting for a whole 40 ms packet: the first chunk of a turn is not)."""
        self._pending = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        chunks, i = [], 0
        while len(self._pending) - i >= OPUS_FRAMES[-1]:
            n = next(f for f in OPUS_FRAMES if f <= len(self._pending) - i)
            chunks.append(self._writer.append_pcm(self._pending[i : i + n]))
            i += n
        self._pending = self._pending[i:]
        return b"".join(chunks)

    def flush(self) -> bytes:
        if not len(self._pending):
            return b""
        pad = OPUS_FRAMES[-1] - len(self._pending) % OPUS_FRAMES[-1]
        return self.encode(np.zeros(pad, dtype=np.float32))


class Pcm16Wire:
    """Raw little-endian 16-bit PCM at 24 kHz mono (``?codec=pcm16``): no encoder needed in
    the browser."""

    name = "pcm16"

    def decode(self, payload: bytes) -> np.ndarray:
        if len(payload) % 2:
            raise AudioInputError(f"PCM16 payload has an odd number of bytes ({len(payload)})")
        return pcm16_to_float(payload)

    def encode(self, pcm: np.ndarray) -> bytes:
        return float_to_pcm16(pcm)

    def flush(self) -> bytes:
        return b""


def pcm16_to_float(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    x = np.clip(np.nan_to_num(np.asarray(pcm, dtype=np.float32)), -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


def make_wire_audio(name: str) -> WireAudio:
    if name == "opus":
        return OpusWire()
    if name == "pcm16":
        return Pcm16Wire()
    raise ValueError(f"unknown wire audio {name!r} (expected one of {', '.join(WIRE_FORMATS)})")
