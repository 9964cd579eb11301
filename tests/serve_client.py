"""Helpers shared by the serve tests: a speech clip, a protocol client, one running server,
hostile clients and the polite session that runs beside them.

The server is deployed once per test process (the websocket and browser tests share it):
the tiny random model, CPU, short turns, a token and an origin list so the refusal paths
are exercised on the same deployment.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from serve_app import protocol as P
from serve_app.audio_io import SAMPLE_RATE, float_to_pcm16, ogg_crc, pcm16_to_float
from tests.commands import ONE_STREAM_ENCODEC
from voxtral.audio import prepare
from voxtral.config import REPO_ROOT

TOKEN = "test-token-1234"
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".webm")
SPEECH_TEXT = "Hello there. How are you doing today? Tell me a story about the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode_file(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as f:
        stream = f.streams.audio[0]
        chunks = [fr.to_ndarray().astype(np.float32) for fr in f.decode(stream)]
        rate = stream.rate
    x = np.concatenate([c.reshape(c.shape[0], -1) for c in chunks], axis=1)
    if x.dtype.kind in "iu":
        x = x / 32768.0
    return x.mean(axis=0), rate


def speech_clip(folder: Path, seconds: float = 1.6) -> np.ndarray:
    """Speech at 24 kHz: the start of a clip of the sample corpus when there is one
    (data/sample), else a sentence synthesized with espeak-ng."""
    sample = REPO_ROOT / "data" / "sample"
    files = sorted(p for p in sample.rglob("*") if p.suffix.lower() in AUDIO_EXTS)
    for path in files:
        try:
            x, rate = _decode_file(path)
        except Exception:
            continue
        y = prepare(x, rate, SAMPLE_RATE).numpy()
        start = int(np.argmax(np.abs(y) > 0.05 * np.abs(y).max()))  # skip leading silence
        y = y[start : start + int(seconds * SAMPLE_RATE)]
        if len(y) >= seconds * SAMPLE_RATE * 0.9:
            return (0.5 * y / max(1e-6, np.abs(y).max())).astype(np.float32)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("no data/sample audio and no espeak-ng to synthesize speech")
    wav = folder / "speech.wav"
    subprocess.run([espeak, "-s", "170", "-w", str(wav), SPEECH_TEXT], check=True)
    import soundfile as sf

    x, rate = sf.read(wav, dtype="float32")
    y = prepare(x, rate, SAMPLE_RATE).numpy()[: int(seconds * SAMPLE_RATE)]
    return (0.5 * y / max(1e-6, np.abs(y).max())).astype(np.float32)


# -- hand-made Ogg/Opus (decompression bombs and other hostile streams) -----------------------
def ogg_page(packets: list[bytes], seq: int, flags: int = 0, serial: int = 7) -> bytes:
    """One Ogg page holding ``packets`` whole (``flags``: 0x02 first page, 0x01 continued)."""
    lacing = []
    for p in packets:
        lacing += [255] * (len(p) // 255) + [len(p) % 255]
    head = b"OggS" + bytes([0, flags]) + bytes(8) + serial.to_bytes(4, "little")
    page = head + seq.to_bytes(4, "little") + bytes(4) + bytes([len(lacing), *lacing])
    page += b"".join(packets)
    return page[:22] + ogg_crc(page).to_bytes(4, "little") + page[26:]


def opus_headers() -> bytes:
    """The OpusHead and OpusTags pages that start an Ogg/Opus stream (mono, 24 kHz)."""
    head = b"OpusHead" + bytes([1, 1]) + (312).to_bytes(2, "little")
    head += SAMPLE_RATE.to_bytes(4, "little") + bytes(3)
    tags = b"OpusTags" + (4).to_bytes(4, "little") + b"test" + bytes(4)
    return ogg_page([head], 0, flags=0x02) + ogg_page([tags], 1)


BOMB_PACKET = bytes([0x83, 0x06])
"""Two bytes of Opus that decode to 15 ms: CELT 2.5 ms frames (config 16), code 3, six
frames of zero bytes each."""


def opus_bomb(pages: int, first_seq: int = 2) -> bytes:
    """Pages of 255 ``BOMB_PACKET`` each: 3.8 s of audio per 800-byte page."""
    return b"".join(ogg_page([BOMB_PACKET] * 255, first_seq + i) for i in range(pages))


class SentMessages:
    """The client's side of an in-process session's socket: every message sent, with the
    time it was sent."""

    def __init__(self):
        self.messages: list[tuple[float, bytes]] = []

    async def __call__(self, m: bytes) -> None:
        self.messages.append((time.monotonic(), m))

    def events(self, name: str | None = None) -> list[dict]:
        evs = [json.loads(m[1:]) | {"_t": t} for t, m in self.messages if m[0] == P.Kind.METADATA]
        return [e for e in evs if name is None or e.get("event") == name]

    def kinds(self) -> list[int]:
        return [m[0] for _, m in self.messages]

    def audio(self) -> list[float]:
        """When each audio message was sent."""
        return [t for t, m in self.messages if m[0] == P.Kind.AUDIO]


@dataclass
class Received:
    t: float
    kind: int
    payload: bytes


@dataclass
class ChatClient:
    """A protocol client that records every message with its arrival time."""

    ws: object
    codec: str
    messages: list[Received] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        import sphn

        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE) if self.codec == "opus" else None
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE) if self.codec == "opus" else None
        self._pending = np.zeros(0, dtype=np.float32)
        self.audio_samples = 0
        self._task = asyncio.ensure_future(self._recv())

    async def _recv(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for m in self.ws:
                data = m if isinstance(m, bytes) else m.encode()
                item = Received(time.monotonic(), data[0], data[1:])
                if item.kind == P.Kind.AUDIO:
                    item.samples = len(self.decode_audio(item.payload))  # type: ignore[attr-defined]
                    self.audio_samples += item.samples  # type: ignore[attr-defined]
                self.messages.append(item)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()

    def decode_audio(self, payload: bytes) -> np.ndarray:
        if self._reader is None:
            return pcm16_to_float(payload)
        pcm = self._reader.append_bytes(payload)
        return np.zeros(0) if pcm is None else np.asarray(pcm)

    def encode_audio(self, pcm: np.ndarray) -> bytes:
        if self._writer is None:
            return float_to_pcm16(pcm)
        self._pending = np.concatenate([self._pending, pcm.astype(np.float32)])
        out = []
        while len(self._pending) >= 960:
            out.append(self._writer.append_pcm(self._pending[:960]))
            self._pending = self._pending[960:]
        return b"".join(out)

    async def send_audio(
        self, pcm: np.ndarray, chunk: int = 1920, realtime: float = 1.0, until=None
    ) -> None:
        """Stream ``pcm`` in ``chunk``-sample messages, paced at ``realtime`` × real time
        (0: as fast as possible); stops early when ``until()`` becomes true."""
        start = time.monotonic()
        for i in range(0, len(pcm), chunk):
            if until is not None and until():
                return
            payload = self.encode_audio(pcm[i : i + chunk])
            if payload:
                await self.ws.send(P.audio(payload))
            if realtime:
                due = start + (i + chunk) / SAMPLE_RATE / realtime
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for m in self.messages:
            if m.kind == P.Kind.METADATA:
                ev = json.loads(m.payload)
                if name is None or ev.get("event") == name:
                    ev["_t"] = m.t
                    out.append(ev)
        return out

    def of_kind(self, kind: int) -> list[Received]:
        return [m for m in self.messages if m.kind == kind]

    async def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.closed.is_set():
                return predicate()
            await asyncio.sleep(0.02)
        return predicate()


async def connect(url: str, codec: str = "pcm16", token: str | None = TOKEN, **kwargs):
    import websockets

    q = f"?codec={codec}" + (f"&token={token}" if token else "")
    ws = await websockets.connect(
        url.replace("http", "ws") + "/api/chat" + q, max_size=None, **kwargs
    )
    return ChatClient(ws, codec)


# -- one server per test process -----------------------------------------------------------
_SERVER: dict[str, object] = {}
DUPLEX_APP = "voxtral-duplex"


def _limits(root: Path, port: int) -> list[str]:
    """The shared server's storage, port, token, origins and limits: the overrides both
    the half-duplex and the full-duplex servers take over the local profile."""
    origins = json.dumps([f"http://127.0.0.1:{port}", f"http://localhost:{port}"])
    return [
        f"storage.root={root}",
        f"serve.port={port}",
        f"serve.token={TOKEN}",
        f"serve.allowed_origins={origins}",
        "serve.max_turn_s=2.5",
        "serve.end_of_turn_ms=300",
        "serve.max_message_bytes=131072",  # room for test_hostile's 100,000-deep JSON
        "serve.idle_timeout_s=8",
        "serve.max_sessions=12",
        "serve.max_sessions_per_client=10",  # test_serve's 8 concurrent sessions share one
        "serve.max_messages_per_s=100",
        "serve.seed=0",
        "serve.num_cpus=1",
        "serve.gateway_num_cpus=0.5",
    ]


def serve_overrides(root: Path, port: int) -> list[str]:
    """The shared server's config over the local profile: half duplex (a 1-stream model),
    as the local profile was (the full random EnCodec), with ``_limits``."""
    return [*ONE_STREAM_ENCODEC, "codec.size=full", *_limits(root, port)]


def shared_root(tmp_path_factory) -> Path:
    """One storage root per test process, so the tiny export is written once."""
    if "root" not in _SERVER:
        _SERVER["root"] = tmp_path_factory.mktemp("serve-run")
    return _SERVER["root"]  # type: ignore[return-value]


def local_serve_config(root: Path, port: int = 8000, extra: list[str] = ()):
    from voxtral.config import DEFAULT_CONFIG, load_config

    return load_config(DEFAULT_CONFIG, [*serve_overrides(root, port), *extra], env={})


def server_url(root: Path) -> str:
    """Deploy the application once (tiny model, CPU) and return its base URL; deploy it
    again if another test replaced or shut down Serve since."""
    if "url" in _SERVER and not _is_up(_SERVER["url"]):  # type: ignore[arg-type]
        del _SERVER["url"]
    if "url" not in _SERVER:
        from serve_app.app import deploy
        from voxtral.config import DEFAULT_CONFIG, load_config

        port = free_port()
        cfg = load_config(DEFAULT_CONFIG, serve_overrides(root, port), env={})
        _SERVER["url"] = deploy(cfg)["url"]
        _SERVER["cfg"] = cfg
        wait_healthy(_SERVER["url"])  # type: ignore[arg-type]
    return _SERVER["url"]  # type: ignore[return-value]


def full_duplex_config(root: Path, port: int = 8000, extra: list[str] = ()):
    """The local profile as it is (full duplex) with the shared server's limits."""
    from voxtral.config import DEFAULT_CONFIG, load_config

    return load_config(DEFAULT_CONFIG, [*_limits(root, port), *extra], env={})


def full_duplex_url(tmp_path_factory, prefix: str = "/duplex") -> str:
    """A second application beside the shared one (``server_url``), on the same Serve port
    under ``prefix``: the local profile's tiny random 2-stream model in its own storage
    root, served full duplex. Deployed once per test process, as the shared one is (again
    if Serve went away since); the serving modules run last and together (see conftest),
    so both stay up until the session ends."""
    from ray import serve

    from serve_app.app import build_app

    url = server_url(shared_root(tmp_path_factory)) + prefix
    if _SERVER.get("duplex") == url and _is_up(url):
        return url
    port = _SERVER["cfg"].serve.port  # type: ignore[attr-defined]
    cfg = full_duplex_config(tmp_path_factory.mktemp("fd-app"), port)
    serve.run(build_app(cfg), name=DUPLEX_APP, route_prefix=prefix, blocking=False)
    wait_healthy(url)
    _SERVER["duplex"] = url
    return url


def _is_up(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/healthz", timeout=10).ok
    except Exception:
        return False


def wait_healthy(url: str, timeout: float = 180.0) -> dict:
    import requests

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(url + "/healthz", timeout=10)
            if r.status_code == 200:
                return r.json()
            last = r.status_code
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz not healthy: {last}")


def healthz(url: str) -> dict:
    import requests

    return requests.get(url + "/healthz", timeout=20).json()


# -- hostile clients beside a polite one (test_hostile.py, test_duplex_serve.py) ---------------
GAP_S = 2.0  # the polite session may never go this long without a message
HEALTH_S = 1.0  # /healthz must answer within this


@dataclass
class Witness:
    """What the polite session and the health probe saw while a hostile case ran."""

    gaps: list[float] = field(default_factory=list)
    health_s: list[float] = field(default_factory=list)
    closed: bool = False
    errors: list[str] = field(default_factory=list)
    lag_s: float = 0.0  # full duplex: the polite session's audio the model dropped unheard

    def check(self) -> None:
        assert not self.closed, "the polite session was closed"
        assert not self.errors, self.errors
        assert self.gaps and max(self.gaps) <= GAP_S, f"polite session stalled: {self.gaps}"
        assert self.health_s, "no /healthz answer"
        assert max(self.health_s) <= HEALTH_S, f"/healthz too slow: {self.health_s}"


async def _probe_health(url: str, stop: asyncio.Event, out: list[float]) -> None:
    import requests

    while not stop.is_set():
        t = time.monotonic()
        try:
            ok = await asyncio.to_thread(requests.get, url + "/healthz", timeout=5)
            out.append(time.monotonic() - t if ok.status_code == 200 else float("inf"))
        except requests.RequestException:
            out.append(float("inf"))
        await asyncio.sleep(0.5)


async def alongside(
    url: str, hostile: Callable[[], Awaitable[Any]], speech: np.ndarray | None = None
) -> tuple[Any, Witness]:
    """Run ``hostile()`` while a polite session streams at real time and ``/healthz`` is
    probed twice a second. Half duplex (``speech`` None): the polite session streams silence
    and the server pings it every second while it listens; the gaps are between any of its
    messages. Full duplex: it streams ``speech`` over and over, the model's audio comes back
    every group, and the gaps are between audio messages (from the first, before the
    hostile case starts)."""
    polite = await connect(url, "pcm16")
    assert await polite.wait_for(lambda: polite.of_kind(P.Kind.HANDSHAKE), 30)
    stop = asyncio.Event()
    clip = np.zeros(600 * SAMPLE_RATE, np.float32) if speech is None else speech

    async def stream() -> None:
        while not stop.is_set():
            await polite.send_audio(clip, until=stop.is_set)

    talk = asyncio.ensure_future(stream())
    kinds = None if speech is None else (P.Kind.AUDIO,)
    try:
        if kinds is not None:
            assert await polite.wait_for(lambda: polite.of_kind(P.Kind.AUDIO), 30)
        return await witnessed(url, hostile, polite, kinds)
    finally:
        stop.set()
        await asyncio.gather(talk, return_exceptions=True)
        await polite.ws.close()


async def witnessed(
    url: str,
    hostile: Callable[[], Awaitable[Any]],
    polite: ChatClient,
    kinds: tuple[int, ...] | None,
) -> tuple[Any, Witness]:
    """Run ``hostile()`` (and 1.5 s more) beside ``polite``, a session already streaming at
    real time, while ``/healthz`` is probed twice a second: its result, and what the polite
    session and the probe saw meanwhile (gaps between its messages of ``kinds``, None: any)."""
    stop = asyncio.Event()
    health: list[float] = []
    probe = asyncio.ensure_future(_probe_health(url, stop, health))
    t0 = time.monotonic()
    try:
        result = await hostile()
        await asyncio.sleep(1.5)  # and a little after it
    finally:
        stop.set()
        t1 = time.monotonic()
        await asyncio.gather(probe, return_exceptions=True)
    w = Witness(health_s=health, closed=polite.closed.is_set())
    seen = [m.t for m in polite.messages if kinds is None or m.kind in kinds]
    times = [t0, *(t for t in seen if t0 <= t <= t1), t1]
    w.gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    w.errors = [m.payload.decode() for m in polite.of_kind(P.Kind.ERROR)]
    w.lag_s = sum(e["dropped_s"] for e in polite.events("lag") if t0 <= e["_t"] <= t1)
    return result, w


async def hostile_client(url: str, n: int = 2, codec: str = "pcm16", **kw) -> ChatClient:
    """A session from loopback address 127.0.0.n (another client to the server)."""
    return await connect(url, codec, local_addr=(f"127.0.0.{n}", 0), **kw)


class DeafClient:
    """A websocket client that never reads its socket after the handshake (a tiny receive
    buffer, so the server's side fills up), but keeps sending: it is never idle."""

    def __init__(self, url: str, n: int):
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        where = urlsplit(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind((f"127.0.0.{n}", 0))
        self.sock.connect((where.hostname, where.port))
        query = f"/api/chat?codec=pcm16&token={TOKEN}"
        self.proto = ClientProtocol(parse_uri(url.replace("http", "ws") + query))
        self.proto.send_request(self.proto.connect())
        self.sock.sendall(b"".join(self.proto.data_to_send()))
        response = b""
        while b"\r\n\r\n" not in response:  # the handshake, byte by byte: nothing more
            response += self.sock.recv(1)
        self.proto.receive_data(response)
        assert b" 101 " in response.split(b"\r\n")[0], response

    def stream(self, pcm: np.ndarray, seconds: float, talk_s: float | None = None) -> float | None:
        """Send ``pcm`` over and over at real time for ``seconds`` (after ``talk_s``, only an
        END_TURN a second instead: still active, but no more audio for the model); when the
        server drops the connection, return when (else None)."""
        t0, i = time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            if talk_s is None or time.monotonic() - t0 < talk_s:
                self.proto.send_binary(P.audio(float_to_pcm16(pcm[i : i + 1920])))
                i, pause = (i + 1920 if i + 1920 < len(pcm) else 0), 0.08
            else:
                self.proto.send_binary(P.control(P.Control.END_TURN))
                pause = 1.0
            try:
                self.sock.sendall(b"".join(self.proto.data_to_send()))
            except OSError:
                return time.monotonic() - t0
            time.sleep(pause)
        return None

    def close(self) -> None:
        self.sock.close()


async def gateway_sessions_become(url: str, n: int, timeout: float = 10) -> int:
    """Wait (up to ``timeout``) until the Gateway holds ``n`` sessions; how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        now = (await asyncio.to_thread(healthz, url))["gateway_sessions"]
        if now == n or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.2)


async def deaf_session(
    url: str, n: int, clip: np.ndarray, seconds: float = 60, talk_s: float | None = None
):
    """A ``DeafClient`` from 127.0.0.n streams ``clip`` over and over at real time for up
    to ``seconds`` (``talk_s``: see ``DeafClient.stream``); returns the Gateway's sessions
    before it, while it was held, after it was dropped, and when it was dropped (None: it
    never was)."""
    before = (await asyncio.to_thread(healthz, url))["gateway_sessions"]
    deaf = await asyncio.to_thread(DeafClient, url, n)
    held = await gateway_sessions_become(url, before + 1)
    dropped_at = await asyncio.to_thread(deaf.stream, clip, seconds, talk_s)
    after = await gateway_sessions_become(url, before)  # freed once the session has ended
    deaf.close()
    return before, held, after, dropped_at


async def started(c: ChatClient) -> bool:
    """Handshake received (True) or closed without one (False)."""
    await c.wait_for(lambda: c.of_kind(P.Kind.HANDSHAKE) or c.closed.is_set(), 30)
    return bool(c.of_kind(P.Kind.HANDSHAKE))


def settle(url: str, sessions: int = 0, timeout: float = 20) -> dict:
    """Wait until the model holds at most ``sessions`` conversations (earlier tests' sessions
    end asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        h = healthz(url)
        if h["lm"]["sessions"] <= sessions or time.monotonic() > deadline:
            return h
        time.sleep(0.2)


def errors_of(c: ChatClient) -> list[str]:
    return [m.payload.decode() for m in c.of_kind(P.Kind.ERROR)]
