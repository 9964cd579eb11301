"""Half duplex (a 1-stream model): one conversation's turn-taking state machine.

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

The parts both modes share (limits, parsing, the operation queue) are in
:mod:`serve_app.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np

from serve_app import protocol as P
from serve_app.audio_io import SAMPLE_RATE
from serve_app.session import Session, keep_last
from serve_app.vad import OutputEnd, TurnEvent


class HalfDuplexSession(Session):
    MODE = "half_duplex"
    THINKING = "thinking"

    def _init_mode(self) -> None:
        self.output_end = OutputEnd(
            SAMPLE_RATE, self.s.vad_threshold, self.s.turn_end_silence_ms, self.s.start_ms
        )
        self._hearing: asyncio.Future | None = None  # its job in the audio pool
        self.user_speaking = False
        self._preroll: list[np.ndarray] = []
        self._feed_buf: list[np.ndarray] = []
        self._speak: asyncio.Task | None = None
        self._barge_at: float | None = None
        self._turn_end_at: float | None = None
        self._first_sent_at: float | None = None
        self._sent_s = 0.0
        self.turn_index = 0

    def _tasks(self) -> list[asyncio.Task | None]:
        return [self._speak]

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

    async def _run(self, op: tuple[Any, ...]) -> None:
        if op[0] == "end_turn":
            await self.lm.end_turn()
        elif op[0] == "respond":
            self._speak = asyncio.create_task(self._respond())
            await asyncio.wait([self._speak])
        elif op[0] == "interrupt":
            await self.lm.interrupt(op[1])
        else:
            await super()._run(op)

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
