"""Many conversations on one model: the engine thread and its asyncio front.

One thread owns the model and the codec (GPU work from one thread, no locks in the hot
path). Conversations hand it work — user audio to encode and prefill, a turn to generate,
an interrupt — and receive the model's turn chunk by chunk through an asyncio queue. Each
iteration of the thread runs the queued work, then one group for every conversation whose
turn is due, batched, so a long prefill or a slow client never stops the others; turns are
paced to stay at most ``lead_s`` ahead of real time, so an interrupt wastes little and the
context can be cut back to what the listener heard.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.codec_stream import (
    CodecStreamDecoder,
    CodecStreamEncoder,
    decode_many,
    encode_many,
)
from serve_app.generation import LMState, Sampling, SpeechEngine, TextStream
from voxtral.codec import Codec
from voxtral.tokenizer import Layout, StreamDecoder, encode_ids

log = logging.getLogger("ray.serve.voxtral")


class Busy(RuntimeError):
    """The replica already holds ``max_sessions`` conversations (the one ``Busy`` of the
    serving runtime: the Gateway's handle raises it too)."""


class UnknownSession(KeyError):
    """No such conversation here (closed, or its replica restarted)."""


@dataclass(frozen=True)
class SchedulerSettings:
    max_sessions: int = 16
    max_batch: int = 16
    max_turn_s: float = 10.0
    chunk_groups: int = 2  # groups per audio message
    lead_s: float = 0.3  # how far a turn may run ahead of real time
    encoder_context_frames: int = 6
    decoder_context_frames: int = 6


@dataclass
class Turn:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    start_len: int  # ids held when the turn began
    decoder: StreamDecoder
    text: TextStream
    t0: float = field(default_factory=time.monotonic)
    groups: int = 0
    frames: list[np.ndarray] = field(default_factory=list)  # generated, not yet decoded
    pending_text: str = ""
    audio_s: float = 0.0
    busy_s: float = 0.0
    ended: str | None = None

    def post(self, item: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


@dataclass
class _Feed:
    sid: str
    pcm: np.ndarray | None
    end: bool
    fut: Future


@dataclass
class Conversation:
    sid: str
    state: LMState
    encoder: CodecStreamEncoder
    audio_out: CodecStreamDecoder
    held_frames: np.ndarray  # user frames waiting to fill a group
    turn: Turn | None = None
    last_turn: Turn | None = None  # the turn that ended last, while nothing followed it


class Scheduler:
    def __init__(self, engine: SpeechEngine, codec: Codec, tokenizer, settings: SchedulerSettings):
        self.engine, self.codec, self.tokenizer, self.s = engine, codec, tokenizer, settings
        self.layout: Layout = engine.layout
        self.convs: dict[str, Conversation] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._rr = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="voxtral-engine", daemon=True)
        self._thread.start()
        self.steps = 0
        self.batch_hist: dict[int, int] = {}

    # -- asyncio front -------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def _conv(self, sid: str) -> Conversation:
        try:
            return self.convs[sid]
        except KeyError:
            raise UnknownSession(sid) from None

    async def open(self, sid: str) -> dict[str, Any]:
        def job():
            if sid in self.convs:
                return
            if len(self.convs) >= self.s.max_sessions:
                raise Busy(f"this replica already holds {self.s.max_sessions} conversations")
            self.convs[sid] = self._new_conversation(sid)

        await self._call(job)
        return {"sessions": len(self.convs)}

    def _new_conversation(self, sid: str) -> Conversation:
        return Conversation(
            sid=sid,
            state=self.engine.new_state(),
            encoder=CodecStreamEncoder(self.codec, self.s.encoder_context_frames),
            audio_out=CodecStreamDecoder(self.codec, self.s.decoder_context_frames),
            held_frames=np.zeros((self.layout.vocab.n_q, 0), dtype=np.int64),
        )

    async def feed(self, sid: str, pcm: np.ndarray) -> int:
        """User audio (24 kHz float) → codes → prefilled whole groups. Returns ids held."""
        return await self._enqueue_feed(sid, np.asarray(pcm, dtype=np.float32), end=False)

    async def end_turn(self, sid: str) -> int:
        """The user has finished: pad what is left to a whole group and prefill it."""
        return await self._enqueue_feed(sid, None, end=True)

    async def _enqueue_feed(self, sid: str, pcm: np.ndarray | None, end: bool) -> int:
        fut: Future = Future()
        self._jobs.put(_Feed(sid, pcm, end, fut))
        return await asyncio.wrap_future(fut)

    def _prefill(self, c: Conversation, pcm: np.ndarray | None, end: bool) -> int:
        fut: Future = Future()
        self._prefill_many([_Feed(c.sid, pcm, end, fut)])
        return fut.result()

    def _prefill_many(self, feeds: list[_Feed]) -> None:
        """Encode every conversation's new audio in as few codec calls as possible (they
        arrive at the same pace, so their windows match), then prefill each."""
        fpg = self.layout.frames_per_group
        staged = []
        for f in feeds:
            if not f.fut.set_running_or_notify_cancel():
                continue
            c = self.convs.get(f.sid)
            if c is None:
                f.fut.set_exception(UnknownSession(f.sid))
            elif c.turn is not None:
                f.fut.set_exception(RuntimeError("the model is speaking; interrupt it first"))
            else:
                c.last_turn = None
                held = c.held_frames.shape[1]
                staged.append((f, c, c.encoder.stage(f.pcm, f.end, fpg, held)))
        try:
            codes = encode_many([c.encoder for _, c, _ in staged], [st for *_, st in staged])
        except Exception as exc:
            for f, _, _ in staged:
                f.fut.set_exception(exc)
            return
        for (f, c, _), new in zip(staged, codes, strict=True):
            try:
                frames = np.concatenate([c.held_frames, new], axis=1)
                whole = frames.shape[1] // fpg * fpg
                c.held_frames = frames[:, whole:]
                if whole:
                    ids = encode_ids(self.layout, frames[:, :whole], bos=False)
                    self.engine.append(c.state, ids.tolist())
                if f.end:
                    c.encoder.reset()
                f.fut.set_result(c.state.length)
            except Exception as exc:  # this conversation's audio only
                f.fut.set_exception(exc)

    async def respond(self, sid: str) -> AsyncIterator[dict[str, Any]]:
        """The model's turn: dicts with ``audio`` (float32 24 kHz) and/or ``text``, then one
        with ``end`` (eos, max_turn, interrupt, closed, error) and the turn's stats."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def job():
            c = self._conv(sid)
            if c.turn is not None:
                raise RuntimeError("a turn is already being generated")
            if c.held_frames.shape[1] or c.encoder.pending_samples:
                self._prefill(c, None, end=True)
            n = c.state.length
            c.turn = Turn(
                loop, out, n, StreamDecoder(self.layout, index=n), TextStream(self.tokenizer)
            )
            c.audio_out.reset()

        await self._call(job)
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
                self._jobs.put((lambda: self._stop_turn(sid, "cancelled"), Future()))

    async def interrupt(self, sid: str, heard_s: float) -> dict[str, Any]:
        """Stop the turn and keep only the groups the listener heard (``heard_s``)."""

        def job():
            c = self._conv(sid)
            self._stop_turn(sid, "interrupt")
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

        return await self._call(job)

    async def restart(self, sid: str) -> None:
        def job():
            self._stop_turn(sid, "restart")
            self.convs[sid] = self._new_conversation(sid)

        await self._call(job)

    async def close(self, sid: str) -> None:
        def job():
            self._stop_turn(sid, "closed")
            self.convs.pop(sid, None)

        await self._call(job)

    def stats(self) -> dict[str, Any]:
        convs = list(self.convs.values())
        return {
            "sessions": len(convs),
            "generating": sum(c.turn is not None for c in convs),
            "steps": self.steps,
            "batch_sizes": dict(self.batch_hist),
        }

    def alive(self) -> bool:
        """Whether the engine thread still runs (every conversation depends on it)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def shutdown(self) -> None:
        self._stop.set()
        self._jobs.put((lambda: None, Future()))
        self._thread.join(timeout=5)

    # -- engine thread -------------------------------------------------------------------
    def _stop_turn(self, sid: str, reason: str) -> None:
        c = self.convs.get(sid)
        if c is None or c.turn is None:
            return
        t, c.turn = c.turn, None
        c.last_turn = t
        t.ended = reason
        t.post({"end": reason, **self._turn_stats(t)})

    def _turn_stats(self, t: Turn) -> dict[str, Any]:
        wall = time.monotonic() - t.t0
        return {
            "audio_s": round(t.audio_s, 4),
            "wall_s": round(wall, 4),
            "busy_s": round(t.busy_s, 4),
            "groups": t.groups,
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = self._next_due_in()
            try:
                first = self._jobs.get(timeout=timeout) if timeout != 0 else self._jobs.get_nowait()
            except queue.Empty:
                first = None
            batch = [first] if first else []
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            feeds = [job for job in batch if isinstance(job, _Feed)]
            for job in batch:
                if isinstance(job, _Feed):
                    continue
                fn, fut = job
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # reported to the caller, never fatal here
                        fut.set_exception(exc)
            if feeds:  # one conversation has one call in flight, so order is kept
                self._prefill_many(feeds)
            try:
                self._step()
            except Exception:  # a bug in one step must not kill every conversation
                log.exception("generation step failed")

    def _due(self, t: Turn, now: float) -> bool:
        return t.audio_s < (now - t.t0) + self.s.lead_s

    def _next_due_in(self) -> float | None:
        turns = [c.turn for c in self.convs.values() if c.turn is not None]
        if not turns:
            return None
        now = time.monotonic()
        wait = min(t.audio_s - (now - t.t0) - self.s.lead_s for t in turns)
        return max(0.0, min(wait, 0.05))

    def _step(self) -> None:
        now = time.monotonic()
        due = [c for c in self.convs.values() if c.turn is not None and self._due(c.turn, now)]
        if not due:
            return
        start = next(self._rr) % len(due)  # rotate so a full batch is fair to everyone
        due = (due[start:] + due[:start])[: self.s.max_batch]
        t0 = time.monotonic()
        results = self._generate(due)
        ready = []
        for c, ids in results:
            if ids is not None:
                self._take_group(c, ids)
                if self._chunk_ready(c.turn):
                    ready.append(c)
        self._emit(ready)
        busy = time.monotonic() - t0
        for c, _ in results:
            if c.turn is not None:
                c.turn.busy_s += busy
        self.steps += 1
        self.batch_hist[len(due)] = self.batch_hist.get(len(due), 0) + 1

    def _generate(self, convs: list[Conversation]) -> list[tuple[Conversation, list[int] | None]]:
        try:
            out = self.engine.generate_group([c.state for c in convs])
            return list(zip(convs, out, strict=True))
        except Exception:
            if len(convs) == 1:
                log.exception("generation failed for session %s", convs[0].sid)
                self._fail(convs[0])
                return [(convs[0], None)]
        # one conversation broke the batch: find it, keep the others going
        return [pair for c in convs for pair in self._generate([c])]

    def _fail(self, c: Conversation) -> None:
        self._stop_turn(c.sid, "error")

    def _take_group(self, c: Conversation, ids: list[int]) -> None:
        t = c.turn
        frames, text_ids = t.decoder.push(ids)
        t.groups += 1
        t.frames.append(frames)
        t.pending_text += t.text.push(text_ids)
        if self.layout.text and ids[0] == self.layout.vocab.eos:
            t.ended = "eos"
        elif t.groups * self.layout.group_s >= self.s.max_turn_s - 1e-9:
            t.ended = "max_turn"

    def _chunk_ready(self, t: Turn) -> bool:
        """A chunk is whole at ``chunk_groups`` groups; a turn's first goes out after one
        group, since it is the one the listener is waiting for."""
        need = self.s.chunk_groups if t.audio_s > 0 else 1
        return t.ended is not None or len(t.frames) >= need

    def _emit(self, convs: list[Conversation]) -> None:
        if not convs:
            return
        codes = [np.concatenate(c.turn.frames, axis=1) for c in convs]
        pcms = decode_many([c.audio_out for c in convs], codes)
        for c, pcm in zip(convs, pcms, strict=True):
            t = c.turn
            t.frames = []
            if t.ended is not None:
                pcm = np.concatenate([pcm, c.audio_out.flush()])
            t.audio_s += len(pcm) / self.codec.sample_rate
            item: dict[str, Any] = {"audio": pcm, "t": round(t.audio_s, 4)}
            if t.pending_text:
                item["text"], t.pending_text = t.pending_text, ""
            t.post(item)
            if t.ended is not None:
                c.turn, c.last_turn = None, t
                t.post({"end": t.ended, **self._turn_stats(t)})


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

    def respond(self) -> AsyncIterator[dict[str, Any]]:
        return self.s.respond(self.sid)

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
        "max_context": engine.max_context,
    }
    return Scheduler(engine, codec, tokenizer, settings), info
