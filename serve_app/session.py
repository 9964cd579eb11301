"""One conversation's duplex state machine, between the websocket and the model.

The microphone streams in without pause. While nobody speaks the audio only feeds the VAD
and a short pre-roll buffer. When the user starts, the pre-roll and what follows go to the
model in small pieces (encoded and prefilled as they arrive, so the end of a turn leaves
little work). When the VAD hears the user stop, the model's turn is generated and streamed
chunk by chunk. It is half duplex: the model's turn ends when a VAD on its own output hears
it speak and then stay quiet for ``turn_end_silence_ms``, at its ``<eos>``, or at
``max_turn_s``. A quiet end closes the stream, which stops the turn; the context keeps the
turn as generated (all of it sent, but for a chunk or so of that quiet). If the user speaks
over it, the turn is cancelled at once, the client is told to drop its queued audio, and
the model's context is cut back to what was heard.

All model work goes through ``LMClient``; the Ray Serve handle implements it in production
and a local scheduler in tests, so this module knows nothing about Ray.

What a client costs is bounded: its audio by an ``AudioBudget`` (a little ahead of real
time, checked before decoding), the CPU work of an audio message (Ogg, Opus, VAD) and the
VAD on the model's output run in the gateway's audio thread pool, one job of each per
session at a time, so a heavy message never holds the event loop that every other session
shares, and what goes out waits in an ``Outbox``, so a client that stops reading stalls only
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from serve_app.vad import OutputEnd, TurnDetector, TurnEvent
from voxtral.vad import LiveVAD

log = logging.getLogger("ray.serve.voxtral")


class LMClient(Protocol):
    async def open(self) -> dict[str, Any]: ...
    async def feed(self, pcm: np.ndarray) -> Any: ...
    async def end_turn(self) -> Any: ...
    def respond(self) -> AsyncGenerator[dict[str, Any], None]: ...  # closing it stops the turn
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
    feed_ms: float = 240.0  # user audio is sent to the model in pieces this long
    keepalive_s: float = 1.0  # Moshi's client drops a connection silent for 10 s
    playback_delay_s: float = 0.15  # client buffering assumed when estimating what was heard
    max_pending_ops: int = 32  # queued model operations (after coalescing) before 1008
    max_pending_audio_s: float = 60.0  # user audio waiting for the model before 1008
    max_audio_rate: float = 1.5  # seconds of client audio per second of wall time …
    max_audio_ahead_s: float = 10.0  # … in bursts of at most this much; past it 1008
    send_timeout_s: float = 10.0  # a message the client has not taken by then: closed


class DuplexSession:
    LISTENING, THINKING, SPEAKING = "listening", "thinking", "speaking"

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
        """``audio_pool``: where audio messages are decoded and run through the VAD, and the
        model's output through its own (None: the event loop's default executor)."""
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
        self.output_end = OutputEnd(
            SAMPLE_RATE, settings.vad_threshold, settings.turn_end_silence_ms, settings.start_ms
        )
        self._hearing: asyncio.Future | None = None  # its job in the audio pool
        self.state = self.LISTENING
        self.user_speaking = False
        self._preroll: list[np.ndarray] = []
        self._feed_buf: list[np.ndarray] = []
        self._ops: deque[tuple[Any, ...]] = deque()  # bounded and coalesced: see _enqueue
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._speak: asyncio.Task | None = None
        self.last_sent = self.last_active = clock()  # last_active: audio or control only
        self._barge_at: float | None = None
        self._turn_end_at: float | None = None
        self._first_sent_at: float | None = None
        self._sent_s = 0.0
        self.closed = False
        self.lost = False  # the model replica no longer knows this conversation
        self.turn_index = 0

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
        await self.event(event="ready", codec=self.wire.name, sample_rate=SAMPLE_RATE, **info)
        await self.event(event="state", state=self.state)

    async def close(self) -> None:
        """Free everything now (the client is gone or the session ended); what is already
        queued for the client then gets the send timeout to go out."""
        self.closed = True
        for task in (self._speak, self._worker):
            if task is not None:
                task.cancel()
        for task in (self._speak, self._worker):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        try:
            await self.lm.close()
        except Exception:  # the model replica may be gone; nothing left to free then
            log.debug("close failed", exc_info=True)
        await self.outbox.flush()
        await self.outbox.close()

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

    async def on_control(self, code: P.Control) -> None:
        if code == P.Control.END_TURN and self.state == self.LISTENING:
            if not self.user_speaking:  # push-to-talk without VAD onset: use the pre-roll
                self._feed_buf = self._preroll
                self._preroll = []
            await self._end_user_turn()
        elif code == P.Control.RESTART:
            await self._interrupt(notify=self.state != self.LISTENING)
            self.user_speaking = False
            self._feed_buf, self._preroll = [], []
            self._enqueue(("restart",))
            await self.event(event="restart")

    def _listen(self, payload: bytes) -> tuple[np.ndarray, list[TurnEvent]]:
        """The CPU side of an audio message, in the audio pool: decode within the session's
        audio budget (``SessionOverload`` past it), then the VAD's turn events."""
        pcm = self.wire.decode(payload, self.budget.admit)
        if not np.isfinite(pcm).all():
            raise AudioInputError("audio contains NaN or infinite samples")
        return pcm, self.turns.push(self.vad.push(pcm)) if len(pcm) else []

    async def on_audio(self, pcm: np.ndarray, events: list[TurnEvent]) -> None:
        """Decoded audio and its turn events (from ``_listen``) → the state machine."""
        if not len(pcm):
            return
        if self.state == self.LISTENING and self.user_speaking:
            self._feed_buf.append(pcm)
        else:
            self._push_preroll(pcm)
        for ev in events:
            if ev.kind == "start":
                await self._user_started()
            elif ev.kind == "end" and self.user_speaking:
                await self._end_user_turn()
        if self._barge_at is not None and self.turns.speaking:
            if self.turns.t - self._barge_at >= (self.s.interrupt_ms - self.s.start_ms) / 1000:
                self._barge_at = None
                await self._interrupt(notify=True)
                await self._begin_user_turn()
        elif not self.turns.speaking:
            self._barge_at = None
        buffered = sum(map(len, self._feed_buf))
        if self.user_speaking and buffered >= self.s.feed_ms / 1000 * SAMPLE_RATE:
            self._flush_feed()

    def _push_preroll(self, pcm: np.ndarray) -> None:
        """Keep the last ``preroll_ms`` (plus the onset the VAD waits for) of what was heard
        outside a user turn, whatever the size of the messages."""
        keep = round((self.s.preroll_ms + self.s.start_ms) / 1000 * SAMPLE_RATE)
        self._preroll = keep_last([*self._preroll, pcm], keep)

    async def _user_started(self) -> None:
        if self.state == self.LISTENING:
            await self._begin_user_turn()
        else:  # speech over the model (or while it prepares its answer)
            self._barge_at = self.turns.t

    async def _begin_user_turn(self) -> None:
        self.user_speaking = True
        self._feed_buf, self._preroll = self._preroll, []
        await self.event(event="user", speaking=True)

    def _flush_feed(self) -> None:
        if self._feed_buf:
            pcm = np.concatenate(self._feed_buf)
            self._feed_buf = []
            self._enqueue(("feed", pcm))

    async def _end_user_turn(self) -> None:
        self._flush_feed()
        self.user_speaking = False
        self.turn_index += 1
        self._turn_end_at = self.clock()
        self._enqueue(("end_turn",))
        self._enqueue(("respond",))
        await self.event(event="user", speaking=False)
        await self._set_state(self.THINKING)

    async def _interrupt(self, notify: bool) -> None:
        """Stop the model's turn now; the context keeps what the listener heard."""
        heard = 0.0
        if self._first_sent_at is not None:
            played = self.clock() - self._first_sent_at - self.s.playback_delay_s
            heard = max(0.0, min(self._sent_s, played))
        speak, self._speak = self._speak, None
        if speak is not None:
            speak.cancel()
        self._drain_ops()
        self._enqueue(("interrupt", heard))
        self._first_sent_at, self._sent_s = None, 0.0
        if notify:
            await self.event(event="interrupt", heard_s=round(heard, 3))
            if self.on_interrupt is not None:
                self.on_interrupt()
        await self._set_state(self.LISTENING)

    def _drain_ops(self) -> None:
        """Drop a turn that was about to start (the user spoke again before it did)."""
        kept = [op for op in self._ops if op[0] != "respond"]
        self._ops.clear()
        self._ops.extend(kept)

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
                if op[0] == "feed":
                    await self.lm.feed(op[1])
                elif op[0] == "end_turn":
                    await self.lm.end_turn()
                elif op[0] == "respond":
                    self._speak = asyncio.create_task(self._respond())
                    await asyncio.wait([self._speak])
                elif op[0] == "interrupt":
                    await self.lm.interrupt(op[1])
                elif op[0] == "restart":
                    await self.lm.restart()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the model side failed for this session only
                log.exception("model operation %s failed", op[0])
                self.lost = self.lost or "UnknownSession" in repr(exc)
                # the detail is in the log; clients only learn which step failed
                await self.send(P.error(f"model error during {op[0]}; the session goes on"))
                await self._set_state(self.LISTENING)

    async def _respond(self) -> None:
        """Stream the model's turn until it ends: at the model's ``end`` item, or once its
        output has gone quiet after speech (``OutputEnd``; reason ``silence``)."""
        first, new_turn, t0 = True, True, self.clock()
        self._first_sent_at, self._sent_s = None, 0.0
        end: dict[str, Any] | None = None
        async with contextlib.aclosing(self.lm.respond()) as turn:
            async for item in turn:
                pcm = item.get("audio")
                has_audio = pcm is not None and len(pcm) > 0
                if has_audio:
                    payload = self.wire.encode(pcm)
                    if payload:
                        if first:
                            first = False
                            await self._first_audio()
                        await self.send(P.audio(payload))
                    self._sent_s += len(pcm) / SAMPLE_RATE
                if item.get("text"):
                    await self.send(P.text(item["text"]))
                if "end" in item:
                    end = item
                elif has_audio:
                    if await self._output_over(pcm, reset=new_turn):
                        wall_s = self.clock() - t0
                        end = {"end": "silence", "audio_s": self._sent_s, "wall_s": wall_s}
                    new_turn = False
                if end is not None:
                    break  # leaving the block closes the stream: the model stops there
        if end is not None:
            tail = self.wire.flush()
            if tail:
                await self.send(P.audio(tail))
            stats = {k: round(end[k], 4) for k in ("audio_s", "wall_s", "busy_s") if k in end}
            await self.event(event="turn_end", reason=end["end"], **stats)
        if self._speak is asyncio.current_task():
            self._speak = None
        await self._set_state(self.LISTENING)

    async def _output_over(self, pcm: np.ndarray, reset: bool) -> bool:
        """Whether the model's turn is over with ``pcm`` (``OutputEnd``, in the audio pool).
        The job is shielded and awaited before the next, so a cancelled turn's job never
        overlaps the next turn's reset."""
        if self._hearing is not None:
            await asyncio.wait([self._hearing])
        self._hearing = asyncio.get_running_loop().run_in_executor(
            self.audio_pool, self._hear_output, pcm, reset
        )
        return await asyncio.shield(self._hearing)

    def _hear_output(self, pcm: np.ndarray, reset: bool) -> bool:
        if reset:
            self.output_end.reset()
        return self.output_end.push(pcm)

    async def _first_audio(self) -> None:
        now = self.clock()
        self._first_sent_at = now
        latency_ms = (now - self._turn_end_at) * 1000 if self._turn_end_at else 0.0
        await self._set_state(self.SPEAKING)
        await self.event(
            event="first_audio",
            latency_ms=round(latency_ms, 1),
            since_speech_ms=round(latency_ms + self.s.end_of_turn_ms, 1),
        )
        if self.on_first_audio is not None:
            self.on_first_audio(latency_ms + self.s.end_of_turn_ms)
