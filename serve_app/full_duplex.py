"""Full duplex (a 2-stream model): the model listens while it speaks.

There are no turns to detect here. The microphone goes to the model as it arrives (no VAD
gate, no end-of-turn wait), and the model's output streams back without pause, silence
included, one chunk per ``serve.chunk_ms`` of the user's audio: the model hears the user
through its own input stream and takes turns, backchannels and yields on its own, as Moshi
does. The user's audio clocks the model, so a client that streams in real time hears it in
real time; a model that falls behind drops the user audio it cannot hear in time
(``serve.max_lag_ms``) and the client gets a ``lag`` event saying how much.

The events still tell who speaks, for the client's display: ``user`` from the VAD on the
microphone and ``state`` (``speaking`` / ``listening``) from a VAD on the model's output,
both run in the audio pool. The shared parts (limits, parsing, the operation queue) are in
:mod:`serve_app.session`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from serve_app import protocol as P
from serve_app.audio_io import SAMPLE_RATE
from serve_app.session import Session
from serve_app.vad import TurnDetector, TurnEvent
from voxtral.vad import LiveVAD

log = logging.getLogger("ray.serve.voxtral")


class FullDuplexSession(Session):
    MODE = "full_duplex"

    def _init_mode(self) -> None:
        self.model_vad = LiveVAD(SAMPLE_RATE)
        self.model_turns = TurnDetector(
            self.s.vad_threshold, self.s.start_ms, self.s.end_of_turn_ms
        )
        self._output: asyncio.Task | None = None
        self._mic: list[np.ndarray] = []  # the user's audio not yet sent to the model
        self.sent_s = 0.0  # the model's audio sent so far
        self.dropped_s = 0.0  # the user's audio the model could not keep up with

    async def start(self, info: dict[str, Any]) -> None:
        await super().start(info)
        self._output = asyncio.create_task(self._stream())

    def _tasks(self) -> list[asyncio.Task | None]:
        return [self._output]

    # -- the user's side -------------------------------------------------------------
    async def on_audio(self, pcm: np.ndarray, events: list[TurnEvent]) -> None:
        """All of it goes to the model, in pieces of ``duplex_feed_ms`` (one codec call
        each, however small the client's messages; coalesced further while a feed is in
        flight); the VAD's events only tell the client when it hears the user."""
        self._mic.append(pcm)
        if sum(map(len, self._mic)) >= self.s.duplex_feed_ms / 1000 * SAMPLE_RATE:
            self._enqueue(("feed", np.concatenate(self._mic)))
            self._mic = []
        for ev in events:
            await self.event(event="user", speaking=ev.kind == "start")

    async def on_control(self, code: P.Control) -> None:
        """``restart`` forgets the conversation (the output goes on, from a new context);
        ``end_turn`` means nothing here: the model hears when the user stops."""
        if code == P.Control.RESTART:
            self._enqueue(("restart",))
            await self.event(event="restart")

    # -- the model's side ------------------------------------------------------------
    async def _stream(self) -> None:
        """The model's output for the whole conversation: audio and text to the client as
        they come, its VAD's ``state`` events, ``lag`` when the model fell behind."""
        try:
            async for item in self.lm.stream():
                pcm = item.get("audio")
                if pcm is not None and len(pcm):
                    payload = self.wire.encode(pcm)
                    if payload:
                        await self.send(P.audio(payload))
                    self.sent_s += len(pcm) / SAMPLE_RATE
                if item.get("text"):
                    await self.send(P.text(item["text"]))
                if item.get("dropped_s"):
                    self.dropped_s += item["dropped_s"]
                    await self.event(
                        event="lag", dropped_s=item["dropped_s"], total_s=round(self.dropped_s, 3)
                    )
                if "end" in item:  # closed, or the model failed for this conversation
                    if item["end"] != "closed":
                        log.warning("the model's stream ended: %s", item["end"])
                        self.lost = True  # no more output: the gateway closes (1011)
                    return
                if pcm is not None and len(pcm):
                    await self._hear_model(pcm)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the model side failed: the gateway closes the session
            log.exception("the model's stream failed")
            self.lost = True
            await self.send(P.error(f"model error: {type(exc).__name__}; closing"))

    async def _hear_model(self, pcm: np.ndarray) -> None:
        """The model's own VAD (in the audio pool) → ``state`` speaking / listening."""
        loop = asyncio.get_running_loop()
        events = await loop.run_in_executor(
            self.audio_pool, lambda: self.model_turns.push(self.model_vad.push(pcm))
        )
        for ev in events:
            await self._set_state(self.SPEAKING if ev.kind == "start" else self.LISTENING)
