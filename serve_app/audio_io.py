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
import zlib
from collections.abc import Callable, Iterator
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
_REVERSED_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, initial value 0), through zlib's
    C implementation of the reflected CRC-32: a CRC over bit-reversed bytes, bit-reversed, is
    the unreflected one, and zlib's pre- and post-inversion are undone around it. (A Python
    loop over the bytes held the event loop for ~0.3 s per MiB.)"""
    crc = zlib.crc32(data.translate(_REVERSED_BITS), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{crc:032b}"[::-1], 2)


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
    error and the stream resumes at the next message that starts with a page.

    ``push`` yields each page as it is found, so a reader that stops (a page over its
    budget) has paid for no more than the pages it took; ``reset`` then drops the rest."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def reset(self) -> None:
        self._buf.clear()

    def push(self, data: bytes) -> Iterator[bytes]:
        if not self._buf and data and data[:4] != b"OggS"[: len(data[:4])]:
            raise AudioInputError("audio is not an Ogg stream (no 'OggS' capture pattern)")
        self._buf += data
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
            yield page


def is_bos(page: bytes) -> bool:
    """Beginning-of-stream page (carries OpusHead)."""
    return bool(page[5] & 0x02)


def page_packets(page: bytes, continuing: bool) -> tuple[list[bytes], bool]:
    """The packets that start on this (whole, checked) page, the last one possibly cut at
    the page's end, and whether the page ends inside a packet. ``continuing``: the page
    before ended inside one, so a leading continuation belongs to it; a continuation with
    nothing to continue is counted as a packet of its own (it is charged, never skipped)."""
    lacing = page[27 : 27 + page[26]]
    body = memoryview(page)[27 + len(lacing) :]
    packets: list[bytes] = []
    skipping = bool(page[5] & 0x01) and continuing
    start = pos = 0
    for size in lacing:
        pos += size
        if size < 255:  # a packet ends here
            if not skipping:
                packets.append(bytes(body[start:pos]))
            skipping, start = False, pos
    ends_inside = lacing[-1] == 255 if lacing else skipping
    if ends_inside and not skipping:
        packets.append(bytes(body[start:pos]))
    return packets, ends_inside


OPUS_MAX_PACKET_S = 0.120  # RFC 6716 §3.2.5: no packet holds more


def opus_packet_s(packet: bytes) -> float:
    """Seconds of audio an Opus packet decodes to, from its TOC byte (RFC 6716 §3.1), before
    decoding it: the frame duration of its configuration times its frame count, at most the
    120 ms a packet may hold. Ogg's header packets hold none. An empty packet is refused:
    it is not Opus (a packet holds at least its TOC), and decoders conceal it with seconds
    of invented audio (5 s in sphn), the cheapest decompression bomb there is."""
    if not packet:
        raise AudioInputError("empty Opus packet")
    if packet[:8] in (b"OpusHead", b"OpusTags"):
        return 0.0
    config, code = packet[0] >> 3, packet[0] & 0x03
    if config < 12:  # SILK
        frame_ms = (10, 20, 40, 60)[config % 4]
    elif config < 16:  # hybrid
        frame_ms = (10, 20)[config % 2]
    else:  # CELT
        frame_ms = (2.5, 5, 10, 20)[config % 4]
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:  # the count byte; a packet without one is malformed: count it at the maximum
        frames = packet[1] & 0x3F if len(packet) > 1 else 48
    return min(frames * frame_ms / 1000, OPUS_MAX_PACKET_S)


# -- wire formats ------------------------------------------------------------------------
Admit = Callable[[float], None]
"""Called with the seconds of audio a payload (or the next part of it) will decode to,
before it is decoded; it raises to refuse them (``limits.AudioBudget.admit``)."""


def _admit_all(seconds: float) -> None:
    """No budget (tests, tools)."""


class WireAudio(Protocol):
    """One session's wire audio, both ways."""

    name: str  # as the client names it in ``?codec=``

    def decode(self, payload: bytes, admit: Admit = _admit_all) -> np.ndarray:
        """Wire payload → float32 samples at 24 kHz (possibly empty). ``admit`` sees each
        part's duration before that part is decoded."""
        ...

    def encode(self, pcm: np.ndarray) -> bytes:
        """Float samples at 24 kHz → wire payload (possibly empty while buffering)."""
        ...

    def flush(self) -> bytes:
        """Whatever is buffered, padded to a whole packet (end of a model turn)."""
        ...


class OpusWire:
    """Ogg/Opus at 24 kHz mono through sphn, one continuous stream each way per session.

    Decoding goes page by page, and each page's audio (summed from its packets' TOC bytes)
    is admitted before the page reaches the decoder: a bomb (tiny packets of many short
    frames: about 540× their size) is refused at the first page past the budget, having
    cost no more than the budget allows."""

    name = "opus"

    def __init__(self) -> None:
        import sphn

        self._sphn = sphn
        self._pages = OggPages()
        self._headers: list[bytes] = []
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)
        self._in_packet = False  # the last page ended inside a packet
        self._admitted_s = 0.0  # admitted, not yet decoded (a packet across pages)

    def _reset_reader(self) -> None:
        self._reader = self._sphn.OpusStreamReader(SAMPLE_RATE)
        for page in self._headers:
            self._reader.append_bytes(page)
        self._in_packet, self._admitted_s = False, 0.0

    def decode(self, payload: bytes, admit: Admit = _admit_all) -> np.ndarray:
        out: list[np.ndarray] = []
        try:
            self._decode_pages(payload, admit, out)
        except AudioInputError:  # the rest of this message goes with the bad page
            self._pages.reset()
            self._in_packet = False
            raise
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _decode_pages(self, payload: bytes, admit: Admit, out: list[np.ndarray]) -> None:
        for page in self._pages.push(payload):
            if is_bos(page):  # a new logical stream (client restarted its encoder)
                self._headers = [page]
                self._reader = self._sphn.OpusStreamReader(SAMPLE_RATE)
                self._in_packet, self._admitted_s = False, 0.0
            elif len(self._headers) == 1:
                self._headers.append(page)  # OpusTags
            packets, self._in_packet = page_packets(page, self._in_packet)
            claimed = sum(map(opus_packet_s, packets))
            admit(claimed)
            self._admitted_s += claimed
            try:
                pcm = self._reader.append_bytes(page)
            except Exception as exc:  # sphn raises ValueError/RuntimeError on bad packets
                self._reset_reader()
                log.info("undecodable Opus page: %s", exc)  # the library's words stay here
                raise AudioInputError("cannot decode Opus: corrupt or unsupported page") from None
            if pcm is not None and len(pcm):
                out.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
                self._admitted_s -= len(out[-1]) / SAMPLE_RATE
                if self._admitted_s < -0.0025:  # more than the TOC bytes said: charge it too
                    log.warning("Opus decoded %.3f s more than admitted", -self._admitted_s)
                    admit(-self._admitted_s)
                    self._admitted_s = 0.0

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

    def decode(self, payload: bytes, admit: Admit = _admit_all) -> np.ndarray:
        if len(payload) % 2:
            raise AudioInputError(f"PCM16 payload has an odd number of bytes ({len(payload)})")
        admit(len(payload) / 2 / SAMPLE_RATE)
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
