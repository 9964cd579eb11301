"""A conversation between the websocket and the model: what both serving modes share.

Two modes, chosen by the model (see ``serve_app.engine_thread``):

- :class:`~serve_app.half_duplex.HalfDuplexSession` (1-stream models): VAD turn-taking with
  barge-in;
- :class:`~serve_app.full_duplex.FullDuplexSession` (2-stream models): the microphone goes
  to the model without pause and the model's output streams back without pause.

Both take the same messages (the Moshi-compatible protocol) and are held to the same limits.
All model work goes through ``LMClient``; the Ray Serve handle implements it in production
and a local scheduler in tests, so this module knows nothing about Ray.

What a client costs is bounded: its audio by an ``AudioBudget`` (a little ahead of real
time, checked before decoding), the CPU work of an audio message (Ogg, Opus, VAD) and the
VAD on the model's output run in the gateway's audio thread pool, one job of each per
session at a time, so a heavy message never holds the event loop that every other session
shares; model operations wait in a bounded, coalesced queue; and what goes out waits in an
``Outbox``, so a client that stops reading stalls only itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serve_app import protocol as P
from serve_app.audio_io import SAMPLE_RATE, AudioInputError, WireAudio
from serve_app.limits import AudioBudget, SessionOverload
from serve_app.outbox import Outbox
from serve_app.vad import TurnDetector, TurnEvent
from voxtral.vad import LiveVAD

log = logging.getLogger("ray.serve.voxtral")


class LMClient(Protocol):
    async def open(self) -> dict[str, Any]: ...
    async def feed(self, pcm: np.ndarray) -> Any: ...
    async def end_turn(self) -> Any: ...  # half duplex
    def respond(self) -> AsyncGenerator[dict[str, Any], None]: ...  # closing it stops the turn
    def stream(self) -> AsyncGenerator[dict[str, Any], None]: ...  # full duplex
    async def interrupt(self, heard_s: float) -> dict[str, Any]: ...
    async def restart(self) -> None: ...
    async def close(self) -> None: ...


def keep_last(chunks: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The last ``n`` samples of ``chunks`` (fewer if they hold fewer), as chunks."""
    total = sum(map(len, chunks))
    out = list(chunks)
    while out and total - len(out[0]) >= n:
        total -= len(out.pop(0))
    if out and total > n:
        out[0] = out[0][total - n :]
    return out


@dataclass(frozen=True)
class SessionSettings:
    end_of_turn_ms: float = 600.0
    start_ms: float = 96.0  # speech this long starts a user turn
    interrupt_ms: float = 200.0  # speech this long over the model interrupts it
    turn_end_silence_ms: float = 1000.0  # the model's output quiet this long ends its turn
    vad_threshold: float = 0.5
    preroll_ms: float = 400.0  # audio before the detected onset that belongs to the turn
    feed_ms: float = 240.0  # user audio is sent to the model in pieces this long …
    duplex_feed_ms: float = 80.0  # … in full duplex (latency: one Mimi frame, two EnCodec groups)
    keepalive_s: float = 1.0  # Moshi's client drops a connection silent for 10 s
    playback_delay_s: float = 0.15  # client buffering assumed when estimating what was heard
    max_pending_ops: int = 32  # queued model operations (after coalescing) before 1008
    max_pending_audio_s: float = 60.0  # user audio waiting for the model before 1008
    max_audio_rate: float = 1.5  # seconds of client audio per second of wall time …
    max_audio_ahead_s: float = 10.0  # … in bursts of at most this much; past it 1008
    send_timeout_s: float = 10.0  # a message the client has not taken by then: closed
    close_timeout_s: float = 10.0  # the model not freeing a conversation by then: given up


class Session:
    """What both modes share: the outbox, the audio budget, message parsing, the user's VAD
    (in the audio pool), and one model operation at a time from a bounded queue."""

    MODE = ""
    LISTENING, SPEAKING = "listening", "speaking"

    def __init__(
        self,
        lm: LMClient,
        send: Callable[[bytes], Awaitable[None]],
        wire: WireAudio,
        settings: SessionSettings = SessionSettings(),
        on_first_audio: Callable[[float], None] | None = None,
        on_interrupt: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        audio_pool: Executor | None = None,
    ):
        """``on_first_audio`` / ``on_interrupt``: metrics hooks (a turn's first audio, with
        its latency in ms; an interrupt), which only half duplex has. ``audio_pool``: where
        audio messages are decoded and run through the VAD, and the model's output through
        its own (None: the event loop's default executor)."""
        self.lm, self.wire, self.s = lm, wire, settings
        self.on_first_audio, self.on_interrupt = on_first_audio, on_interrupt
        self.clock, self.audio_pool = clock, audio_pool
        self.outbox = Outbox(send, settings.send_timeout_s)  # real time, as the socket's
        self.budget = AudioBudget(settings.max_audio_rate, settings.max_audio_ahead_s, clock)
        self._listening = asyncio.Lock()  # one audio job per session in the pool
        self.vad = LiveVAD(SAMPLE_RATE)
        self.turns = TurnDetector(
            settings.vad_threshold, settings.start_ms, settings.end_of_turn_ms
        )
        self.state = self.LISTENING
        self._ops: deque[tuple[Any, ...]] = deque()  # bounded and coalesced: see _enqueue
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.last_sent = self.last_active = clock()  # last_active: audio or control only
        self.closed = False
        self.lost = False  # the model replica no longer knows this conversation
        self._init_mode()

    def _init_mode(self) -> None:
        """The mode's own state, set up at construction."""

    # -- output --------------------------------------------------------------------------
    async def send(self, message: bytes) -> None:
        """Queue ``message`` for the client (never waits on the socket: see ``Outbox``)."""
        if self.closed:
            return
        self.outbox.put(message)
        self.last_sent = self.clock()

    async def flush(self) -> bool:
        """Wait until what was sent is written (before closing the websocket after it)."""
        return await self.outbox.flush()

    @property
    def stalled(self) -> str | None:
        """Why the client can no longer be written to (it stopped reading), if it cannot."""
        return self.outbox.failed

    async def event(self, **obj: Any) -> None:
        await self.send(P.metadata(obj))

    async def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            await self.event(event="state", state=state)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, info: dict[str, Any]) -> None:
        await self.lm.open()
        self._worker = asyncio.create_task(self._work())
        await self.send(P.handshake())
        await self.event(
            event="ready", mode=self.MODE, codec=self.wire.name, sample_rate=SAMPLE_RATE, **info
        )
        await self.event(event="state", state=self.state)

    async def close(self) -> None:
        """Free everything now (the client is gone or the session ended); what is already
        queued for the client then gets the send timeout to go out."""
        self.closed = True
        tasks = [t for t in (*self._tasks(), self._worker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # bounded: a model call that never returns must not hold the websocket
            await asyncio.wait_for(self.lm.close(), self.s.close_timeout_s)
        except TimeoutError:
            log.warning("the model did not close the conversation in %g s", self.s.close_timeout_s)
        except Exception:  # the model replica may be gone; nothing left to free then
            log.debug("close failed", exc_info=True)
        await self.outbox.flush()
        await self.outbox.close()

    def _tasks(self) -> list[asyncio.Task | None]:
        """The mode's own tasks, cancelled at ``close`` before the model operations."""
        return []

    async def keepalive(self) -> None:
        if self.state != self.SPEAKING and self.clock() - self.last_sent >= self.s.keepalive_s:
            await self.send(P.ping())

    # -- input ---------------------------------------------------------------------------
    async def on_message(self, raw: bytes | str) -> None:
        """One websocket message; protocol and audio errors are answered with 0x05, any
        other failure with a generic 0x05 (the detail goes to the log, never to the
        client). Only ``SessionOverload`` escapes: the session must end."""
        try:
            msg = P.decode(raw)
            if msg.kind == P.Kind.AUDIO:
                async with self._listening:
                    loop = asyncio.get_running_loop()
                    pcm, events = await loop.run_in_executor(
                        self.audio_pool, self._listen, msg.payload
                    )
                self.last_active = self.clock()  # pings and junk do not keep a session
                await self.on_audio(pcm, events)
            elif msg.kind == P.Kind.CONTROL:
                code = P.read_control(msg.payload)
                self.last_active = self.clock()
                await self.on_control(code)
            elif msg.kind == P.Kind.METADATA:
                P.read_metadata(msg.payload)  # validated; no client metadata is used yet
            elif msg.kind == P.Kind.TEXT:
                P.read_text(msg.payload)  # typed text is not used by this model yet
            elif msg.kind != P.Kind.PING:
                raise P.ProtocolError(f"kind 0x{msg.kind:02x} is server → client only")
        except SessionOverload:
            raise
        except (P.ProtocolError, AudioInputError) as exc:
            await self.send(P.error(str(exc)))
        except Exception:
            log.exception("message handling failed")
            await self.send(P.error("internal error while handling that message"))

    def _listen(self, payload: bytes) -> tuple[np.ndarray, list[TurnEvent]]:
        """The CPU side of an audio message, in the audio pool: decode within the session's
        audio budget (``SessionOverload`` past it), then the VAD's turn events."""
        pcm = self.wire.decode(payload, self.budget.admit)
        if not np.isfinite(pcm).all():
            raise AudioInputError("audio contains NaN or infinite samples")
        return pcm, self.turns.push(self.vad.push(pcm)) if len(pcm) else []

    def _enqueue(self, op: tuple[Any, ...]) -> None:
        """Queue a model operation, coalesced so a flood of controls costs O(1) each: a
        restart replaces everything queued (it makes that work moot), back-to-back feeds
        merge into one, back-to-back interrupts keep the latest. The queue and the audio
        waiting in it are bounded; past either, ``SessionOverload``."""
        ops, kind = self._ops, op[0]
        if kind == "restart":
            ops.clear()
        elif ops and ops[-1][0] == kind == "feed":
            pcm = np.concatenate([ops[-1][1], op[1]])
            if len(pcm) > self.s.max_pending_audio_s * SAMPLE_RATE:
                raise SessionOverload(
                    f"more than {self.s.max_pending_audio_s:g} s of audio waiting for the model"
                )
            ops[-1] = ("feed", pcm)
            return
        elif ops and ops[-1][0] == kind == "interrupt":
            ops[-1] = op
            return
        if len(ops) >= self.s.max_pending_ops:
            raise SessionOverload(f"more than {self.s.max_pending_ops} operations queued")
        ops.append(op)
        self._wake.set()

    @property
    def pending_ops(self) -> int:
        return len(self._ops)

    # -- model side ----------------------------------------------------------------------
    async def _work(self) -> None:
        """Run model operations one at a time, in order (feed after interrupt, …)."""
        while True:
            while not self._ops:
                self._wake.clear()
                await self._wake.wait()
            op = self._ops.popleft()
            try:
                await self._run(op)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the model side failed for this session only
                log.exception("model operation %s failed", op[0])
                self.lost = self.lost or "UnknownSession" in repr(exc)
                # the detail is in the log; clients only learn which step failed
                await self.send(P.error(f"model error during {op[0]}; the session goes on"))
                await self._set_state(self.LISTENING)

    async def _run(self, op: tuple[Any, ...]) -> None:
        """One model operation (``feed`` and ``restart`` here; the modes add theirs)."""
        if op[0] == "feed":
            await self.lm.feed(op[1])
        elif op[0] == "restart":
            await self.lm.restart()
        else:
            raise ValueError(f"unknown operation {op[0]!r}")

    # -- the mode's part -----------------------------------------------------------------
    async def on_audio(self, pcm: np.ndarray, events: list[TurnEvent]) -> None:
        """Decoded audio and the user's turn events (from ``_listen``)."""
        raise NotImplementedError

    async def on_control(self, code: P.Control) -> None:
        raise NotImplementedError
