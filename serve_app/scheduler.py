"""Many conversations on one model: the asyncio front of the engine thread.

The model and the codec run on one thread (:mod:`serve_app.engine_thread`, which batches the
conversations' work); this front is what a replica's handlers call. It turns each call into
an operation on that thread and awaits its result, keeps the replica's conversation limit,
and streams a model turn from the thread to the caller chunk by chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.engine_thread import Conversation, EngineThread
from voxtral.codec import Codec
from voxtral.generation import SpeechEngine
from voxtral.layout import Layout
from voxtral.sampling import Sampling


class Busy(RuntimeError):
    """The replica already holds ``max_sessions`` conversations (the one ``Busy`` of the
    serving runtime: the Gateway's handle raises it too)."""


@dataclass(frozen=True)
class SchedulerSettings:
    """The replica's limits and pacing (from ``serve.*``; see ``build_scheduler``)."""

    max_sessions: int = 16
    max_batch: int = 16
    max_turn_s: float = 10.0
    chunk_groups: int = 2  # groups per audio message
    lead_s: float = 0.3  # how far a turn may run ahead of real time
    max_lag_s: float = 1.0  # full duplex: user audio waiting for the model past this is dropped
    encoder_context_frames: int = 6
    decoder_context_frames: int = 6


class Scheduler:
    """Conversations by session id on one engine thread. It owns the thread: ``shutdown()``
    (or leaving a ``with`` block) stops it; the SpeechLM replica calls it when Serve stops
    the replica."""

    def __init__(self, engine: SpeechEngine, codec: Codec, tokenizer, settings: SchedulerSettings):
        self.engine, self.codec, self.tokenizer, self.s = engine, codec, tokenizer, settings
        self.layout: Layout = engine.layout
        self.thread = EngineThread(engine, codec, tokenizer, settings)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def convs(self) -> dict[str, Conversation]:
        """The conversations held (read-only outside the engine thread)."""
        return self.thread.convs

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread and await its result."""
        return await asyncio.wrap_future(self.thread.call(fn))

    async def open(self, sid: str) -> dict[str, Any]:
        def op():
            if sid in self.convs:
                return
            if len(self.convs) >= self.s.max_sessions:
                raise Busy(f"this replica already holds {self.s.max_sessions} conversations")
            self.convs[sid] = self.thread.new_conversation(sid)

        await self._call(op)
        return {"sessions": len(self.convs)}

    async def feed(self, sid: str, pcm: np.ndarray) -> int:
        """User audio (24 kHz float) → codes → whole groups: prefilled (half duplex; returns
        the ids held) or queued for the next steps (full duplex; returns the groups waiting)."""
        pcm = np.asarray(pcm, dtype=np.float32)
        return await asyncio.wrap_future(self.thread.feed(sid, pcm, end=False))

    async def end_turn(self, sid: str) -> int:
        """The user has finished: pad what is left to a whole group and prefill it."""
        self._check_mode(False, "end_turn")
        return await asyncio.wrap_future(self.thread.feed(sid, None, end=True))

    @property
    def duplex(self) -> bool:
        """Full duplex (a 2-stream model: ``stream``) or half duplex (turns: ``respond``)."""
        return self.thread.duplex

    def _check_mode(self, duplex: bool, what: str) -> None:
        if self.duplex != duplex:
            mode = "full duplex (it streams)" if self.duplex else "half duplex (it takes turns)"
            raise RuntimeError(f"{what} does not apply: this model is {mode}")

    async def respond(self, sid: str) -> AsyncGenerator[dict[str, Any], None]:
        """The model's turn: dicts with ``audio`` (float32 24 kHz) and/or ``text``, then one
        with ``end`` (eos, max_turn, interrupt, closed, error) and the turn's stats."""
        self._check_mode(False, "respond")

        def begin(c: Conversation, loop: asyncio.AbstractEventLoop, out: asyncio.Queue) -> None:
            if c.turn is not None:
                raise RuntimeError("a turn is already being generated")
            self.thread.begin_turn(c, loop, out)

        async for item in self._output(sid, begin):
            yield item

    async def stream(self, sid: str) -> AsyncGenerator[dict[str, Any], None]:
        """Full duplex: the model's side of the whole conversation, one dict per group of
        the user's audio fed (``audio``, and ``text`` / ``dropped_s`` when there are some),
        until the conversation closes (a last dict with ``end``)."""
        self._check_mode(True, "stream")
        async for item in self._output(sid, self.thread.begin_stream):
            yield item

    async def _output(self, sid: str, begin: Callable) -> AsyncGenerator[dict[str, Any], None]:
        """The items the engine thread posts for the conversation's output, opened by
        ``begin(conversation, loop, queue)`` on the thread, until one with ``end``."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        await self._call(lambda: begin(self.thread.conversation(sid), loop, out))
        finished = False
        try:
            while True:
                item = await out.get()
                yield item
                if "end" in item:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away (interrupt, disconnect): stop now
                self.thread.call(lambda: self.thread.stop_turn(sid, "cancelled"))

    async def interrupt(self, sid: str, heard_s: float) -> dict[str, Any]:
        """Stop the turn and keep only the groups the listener heard (``heard_s``)."""
        self._check_mode(False, "interrupt")

        def op():
            c = self.thread.conversation(sid)
            self.thread.stop_turn(sid, "interrupt")
            t, g = c.last_turn, self.layout.group_len
            if t is None or c.state.length != t.start_len + t.groups * g:
                return {"kept_s": 0.0, "generated_s": 0.0}  # nothing of it left to cut
            kept = min(t.groups, int(heard_s / self.layout.group_s + 1e-6))
            self.engine.crop(c.state, t.start_len + kept * g)
            c.last_turn = None
            return {
                "kept_s": kept * self.layout.group_s,
                "generated_s": t.groups * self.layout.group_s,
            }

        return await self._call(op)

    async def restart(self, sid: str) -> None:
        await self._call(lambda: self.thread.restart(sid))

    async def close(self, sid: str) -> None:
        def op():
            self.thread.stop_turn(sid, "closed")
            self.convs.pop(sid, None)

        await self._call(op)

    def stats(self) -> dict[str, Any]:
        convs = list(self.convs.values())
        return {
            "mode": "full_duplex" if self.duplex else "half_duplex",
            "sessions": len(convs),
            "generating": sum(c.turn is not None for c in convs),
            "steps": self.thread.steps,
            "batch_sizes": dict(self.thread.batch_hist),
            "unheard_audio_s": round(self.thread.unheard_s, 3),
        }

    def alive(self) -> bool:
        """Whether the engine thread still runs (every conversation depends on it)."""
        return self.thread.alive()

    def shutdown(self) -> None:
        """Stop the engine thread (idempotent); conversations still open get no more turns."""
        self.thread.shutdown()


class LocalLM:
    """``session.LMClient`` over an in-process scheduler (tests, benchmarks, scripts)."""

    def __init__(self, scheduler: Scheduler, sid: str):
        self.s, self.sid = scheduler, sid

    async def open(self) -> dict[str, Any]:
        return await self.s.open(self.sid)

    async def feed(self, pcm: np.ndarray) -> int:
        return await self.s.feed(self.sid, pcm)

    async def end_turn(self) -> int:
        return await self.s.end_turn(self.sid)

    def respond(self) -> AsyncGenerator[dict[str, Any], None]:
        return self.s.respond(self.sid)

    def stream(self) -> AsyncGenerator[dict[str, Any], None]:
        return self.s.stream(self.sid)

    async def interrupt(self, heard_s: float) -> dict[str, Any]:
        return await self.s.interrupt(self.sid, heard_s)

    async def restart(self) -> None:
        await self.s.restart(self.sid)

    async def close(self) -> None:
        await self.s.close(self.sid)


def build_scheduler(cfg, source: dict[str, str]) -> tuple[Scheduler, dict[str, Any]]:
    """Model + codec + engine + scheduler for a pipeline config and a model source
    (``model_source.ModelSource.describe()``): what one SpeechLM replica holds."""
    import torch

    from serve_app.model_source import codec_config_for, materialize
    from voxtral.codec import load_codec
    from voxtral.model import load_speech_lm

    s = cfg.serve
    use_gpu = s.num_gpus > 0 and torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    dtype = getattr(torch, cfg.model.dtype) if use_gpu else torch.float32
    if not use_gpu:
        torch.set_num_threads(max(1, round(s.num_cpus)))
    folder = materialize(source["model"])
    model, tokenizer, layout, meta = load_speech_lm(folder, dtype=dtype, device=device)
    codec = load_codec(codec_config_for(meta, layout, cfg), device)
    text = Sampling(s.text_temperature, s.text_top_k, s.text_top_p)
    audio = Sampling(s.audio_temperature, s.audio_top_k, s.audio_top_p)
    engine = SpeechEngine(model, layout, text, audio, s.max_context_tokens, seed=s.seed)
    settings = SchedulerSettings(
        max_sessions=s.max_sessions,
        max_batch=s.max_sessions,
        max_turn_s=s.max_turn_s,
        chunk_groups=max(1, round(s.chunk_ms / 1000 / layout.group_s)),
        lead_s=s.lead_ms / 1000,
        max_lag_s=s.max_lag_ms / 1000,
    )
    info = {
        **source,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "codec": layout.codec,
        "n_q": layout.vocab.n_q,
        "frame_rate": layout.frame_rate,
        "group_ms": round(layout.group_s * 1000, 3),
        "text": layout.text,
        "streams": layout.streams,
        "mode": "full_duplex" if layout.streams == 2 else "half_duplex",
        "max_context": engine.max_context,
    }
    return Scheduler(engine, codec, tokenizer, settings), info
