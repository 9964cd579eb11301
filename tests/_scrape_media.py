"""Test media for the scrape stage: real speech re-encoded with PyAV, and a loopback server.

Speech comes from the bundled sample corpus (``data/sample``: espeak-ng dialogues with
``.vtt`` captions), so the ground truth (when each clause is spoken) is known. Used by
``tests/test_scrape.py`` and ``bench/scrape.py``.
"""

from __future__ import annotations

import http.server
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from voxtral.audio import resample
from voxtral.config import REPO_ROOT
from voxtral.media import decode_stream

SAMPLE = REPO_ROOT / "data" / "sample"
SR = 24000
_CUE = re.compile(r"(\d+):(\d{2}):(\d{2}\.\d{3}) --> (\d+):(\d{2}):(\d{2}\.\d{3})")
CONTENT_TYPES = {
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".m4a": "audio/mp4",
    ".wav": "audio/wav",
    ".webm": "audio/webm",
    ".flac": "audio/flac",
}


@dataclass
class Speech:
    """Mono audio at 24 kHz and the spans (seconds) where someone speaks."""

    audio: np.ndarray
    cues: list[tuple[float, float]]

    @property
    def seconds(self) -> float:
        return len(self.audio) / SR

    @property
    def speech_s(self) -> float:
        """Seconds with someone speaking (cues of two speakers may overlap: their union)."""
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.cues):
            total += max(0.0, b - max(a, end))
            end = max(end, b)
        return total


def cues_of(vtt: Path) -> list[tuple[float, float]]:
    out = []
    for m in _CUE.finditer(vtt.read_text(encoding="utf-8")):
        h1, m1, s1, h2, m2, s2 = m.groups()
        out.append(
            (int(h1) * 3600 + int(m1) * 60 + float(s1), int(h2) * 3600 + int(m2) * 60 + float(s2))
        )
    return out


def sample_speech(stem: str, max_s: float | None = None) -> Speech:
    """A sample dialogue, cut in a pause so that it lasts at most ``max_s`` seconds."""
    path = next(p for p in SAMPLE.glob(f"{stem}.*") if p.suffix not in (".vtt", ".rttm"))
    audio = np.concatenate(list(decode_stream(str(path), SR)))
    cues = cues_of(SAMPLE / f"{stem}.vtt")
    if max_s is not None:
        cues = [c for c in cues if c[1] <= max_s - 0.5]
        audio = audio[: int((cues[-1][1] + 0.4) * SR)]
    return Speech(audio, cues)


def loop_speech(stems: list[str], seconds: float) -> Speech:
    """Speech of at least ``seconds``: the sample dialogues one after another, repeated."""
    parts, cues, t = [], [], 0.0
    while t < seconds:
        for stem in stems:
            s = sample_speech(stem)
            parts.append(s.audio)
            cues += [(a + t, b + t) for a, b in s.cues]
            t += s.seconds
    return Speech(np.concatenate(parts), cues)


def _pcm(block: np.ndarray, fmt: str) -> np.ndarray:
    kinds = {"s16": (np.int16, 32767), "s32": (np.int32, 2**31 - 1), "flt": (np.float32, 1)}
    dtype, peak = kinds[fmt.rstrip("p")]
    out = (block * peak).astype(dtype) if peak != 1 else block.astype(dtype)
    return np.ascontiguousarray(out if fmt.endswith("p") else out.T.reshape(1, -1))


def encode(
    path: Path,
    audio: np.ndarray,
    rate: int,
    codec: str,
    container: str,
    stereo: bool = False,
    bit_rate: int | None = None,
    channels: int | None = None,
) -> Path:
    """Mono 24 kHz float audio → a media file (stereo: the two channels at different gains;
    ``channels`` 6 or 8: 5.1 or 7.1, gains falling from 0.9 to 0.2)."""
    import torch

    x = resample(torch.from_numpy(audio), SR, rate).numpy()
    n = channels or (2 if stereo else 1)
    gains = [0.9, 0.5] if n == 2 else np.linspace(0.9, 0.2, n) if n > 2 else [1.0]
    data = np.clip(np.stack([x * g for g in gains]), -1, 1)
    layout = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}[n]
    with av.open(str(path), "w", format=container) as c:
        st = c.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            st.bit_rate = bit_rate
        st.codec_context.open()
        fmt = st.codec_context.format.name
        size = st.codec_context.frame_size or 2048
        for i in range(0, data.shape[1], size):
            frame = av.AudioFrame.from_ndarray(
                _pcm(data[:, i : i + size], fmt), format=fmt, layout=layout
            )
            frame.sample_rate = rate
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return path


def silent_hour(path: Path, seconds: float = 3600.0) -> Path:
    """An hour of silence as 8 kbps MP3 in well under a second: one silent frame is
    encoded, then its packet is muxed again and again with advancing timestamps."""
    with av.open(str(path), "w", format="mp3") as c:
        st = c.add_stream("libmp3lame", rate=8000, layout="mono")
        st.bit_rate = 8000
        st.codec_context.open()
        fmt, size = st.codec_context.format.name, st.codec_context.frame_size
        packets = []
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(
                _pcm(np.zeros((1, size)), fmt), format=fmt, layout="mono"
            )
            frame.sample_rate, frame.pts = 8000, i * size
            packets += list(st.encode(frame))
        for p in packets:
            c.mux(p)
        last = packets[-1]
        payload, step, tb = bytes(last), last.duration or size, last.time_base or Fraction(1, 8000)
        pts = last.pts
        for _ in range(int(seconds * 8000 / step)):
            pts += step
            q = av.Packet(payload)
            q.pts = q.dts = pts
            q.duration, q.time_base, q.stream = step, tb, st
            c.mux(q)
    return path


# -- loopback HTTP server ---------------------------------------------------------------------


@dataclass
class Route:
    """How the server answers one path: ``file`` (serve it), ``status`` (that HTTP code),
    ``slow`` (wait ``delay_s`` first), ``cut`` (announce the whole file, send half),
    ``flaky`` (503 until the server is fixed, then the file) or ``unsized`` (the file with
    no Content-Length: its end is the closed connection)."""

    kind: str
    path: Path | None = None
    status: int = 200
    delay_s: float = 0.0


@dataclass
class Loopback:
    routes: dict[str, Route] = field(default_factory=dict)
    fixed: bool = False
    hits: Counter = field(default_factory=Counter)
    server: http.server.ThreadingHTTPServer | None = None

    def url(self, name: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def serve(routes: dict[str, Route]) -> Loopback:
    """Start a threaded HTTP server on 127.0.0.1 (any free port) answering ``routes``."""
    state = Loopback(routes=routes)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _answer(self, body: bool) -> None:
            name = self.path.split("?", 1)[0].lstrip("/")
            state.hits[name] += 1
            route = state.routes.get(name)
            if route is None:
                return self._status(404, body)
            if route.kind == "status":
                return self._status(route.status, body)
            if route.kind == "flaky" and not state.fixed:
                return self._status(503, body)
            if route.kind == "slow":
                time.sleep(route.delay_s)
            data_len = route.path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(route.path.suffix, "audio/mpeg"))
            if route.kind == "unsized":
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(data_len))
            self.send_header("Accept-Ranges", "none")
            self.end_headers()
            if not body:
                return
            limit = data_len // 2 if route.kind == "cut" else data_len
            try:
                with open(route.path, "rb") as f:
                    sent = 0
                    while sent < limit:
                        buf = f.read(min(1 << 16, limit - sent))
                        if not buf:
                            break
                        self.wfile.write(buf)
                        sent += len(buf)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client read the headers it wanted and hung up
            if route.kind == "cut":
                self.close_connection = True

        def _status(self, code: int, body: bool) -> None:
            msg = f"status {code}\n".encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if body:
                self.wfile.write(msg)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            pass  # clients hanging up early is part of the tests

    state.server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=state.server.serve_forever, daemon=True).start()
    return state


def copy_sample(dest: Path) -> Path:
    """The bundled sample corpus (audio + captions) copied to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in SAMPLE.iterdir():
        if p.suffix != ".py":
            shutil.copy(p, dest / p.name)
    return dest


# -- a scrape on two nodes, one of which leaves --------------------------------------------------


def scrape_while_a_node_leaves(cfg_json: str, leave_after_files: int = 2) -> dict:
    """Run the scrape stage on a fresh two-node ``ray.cluster_utils.Cluster`` and remove the
    worker node (no grace) once ``leave_after_files`` videos are written. Meant to run in its
    own process, so the test session's Ray is left alone."""
    import ray
    from ray.cluster_utils import Cluster

    from voxtral.config import Config
    from voxtral.stages.scrape import run_scrape
    from voxtral.storage import Storage

    cfg = Config.model_validate_json(cfg_json)
    storage = Storage(cfg.storage.root)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    worker = cluster.add_node(num_cpus=2)
    done_at_removal: list[int] = []
    try:
        ray.init(address=cluster.address)

        def leave() -> None:
            deadline = time.monotonic() + 120
            while (
                time.monotonic() < deadline and len(storage.listdir("chunks")) < leave_after_files
            ):
                time.sleep(0.05)
            done_at_removal.append(len(storage.listdir("chunks")))
            cluster.remove_node(worker, allow_graceful=False)

        killer = threading.Thread(target=leave, daemon=True)
        killer.start()
        summary = run_scrape(cfg)
        killer.join(timeout=120)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"done_at_removal": done_at_removal, "summary": summary}
