"""The engine thread: the one thread that runs the model and the codec for every conversation
on a replica (GPU work from one thread, no locks in the hot path).

Work reaches it through one operation queue, filled by its asyncio front
(:class:`serve_app.scheduler.Scheduler`): functions to run on the thread (open, interrupt,
close…) and user audio to encode and prefill. Each iteration runs the queued operations,
encodes every conversation's new audio in as few codec calls as possible, then generates one
group for every conversation whose turn is due, batched, so a long prefill or a slow client
never stops the others.

Two modes, by the model's layout:

- **half duplex** (1 stream): the model speaks in turns. A turn is paced to stay at most
  ``lead_s`` ahead of real time, so an interrupt wastes little and the context can be cut
  back to what the listener heard.
- **full duplex** (2 streams): the conversation's output never stops. Each group of the
  user's audio, once encoded, fills the user slots of the next group while the model samples
  its own slots, and the model's group goes out at once, silence included (Moshi's loop).
  The microphone is the clock; a conversation the model cannot keep up with loses its oldest
  waiting user audio past ``max_lag_s`` (reported), so nothing queues without bound.

It is one class (and this module a little over 400 lines) on purpose: everything in
:class:`EngineThread` runs on its thread over state nothing else touches, and that is what
lets the hot path go without locks. Turns, feeds and steps split into other modules would
all reach into the same conversations.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from voxtral.codec import Codec
from voxtral.codec.streaming import (
    CodecStreamDecoder,
    CodecStreamEncoder,
    decode_many,
    encode_many,
)
from voxtral.generation import LMState, SpeechEngine, TextStream
from voxtral.interleave import StreamDecoder, audio_slot_ids, encode_ids
from voxtral.layout import Layout

if TYPE_CHECKING:
    from serve_app.scheduler import SchedulerSettings

log = logging.getLogger("ray.serve.voxtral")


class UnknownSession(KeyError):
    """No such conversation here (closed, or its replica restarted)."""


@dataclass
class Turn:
    """One model turn in progress: what it generated, and the queue its chunks go to. In
    full duplex the one "turn" is the model's output for the whole conversation."""

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
        """Hand ``item`` to the turn's reader (its asyncio loop) from the engine thread; a
        reader whose loop has closed is gone, so its turn ends (for it alone)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed
            self.ended = self.ended or "closed"

    def stats(self) -> dict[str, Any]:
        """What the turn's ``end`` item reports."""
        return {
            "audio_s": round(self.audio_s, 4),
            "wall_s": round(time.monotonic() - self.t0, 4),
            "busy_s": round(self.busy_s, 4),
            "groups": self.groups,
        }


@dataclass
class _Feed:
    """User audio for one conversation (``pcm`` None: the end of the user's turn)."""

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
    user_groups: deque[list[int]] = field(default_factory=deque)  # full duplex: ready groups
    dropped_s: float = 0.0  # full duplex: user audio dropped unheard, not yet reported
    turn: Turn | None = None
    last_turn: Turn | None = None  # the turn that ended last, while nothing followed it


class EngineThread:
    """The thread, its operation queue and the conversations it holds. Everything that
    touches ``convs`` runs on the thread; other threads only queue operations."""

    def __init__(self, engine: SpeechEngine, codec: Codec, tokenizer, settings: SchedulerSettings):
        self.engine, self.codec, self.tokenizer, self.s = engine, codec, tokenizer, settings
        self.layout: Layout = engine.layout
        self.convs: dict[str, Conversation] = {}
        self.steps = 0
        self.batch_hist: dict[int, int] = {}
        self.unheard_s = 0.0  # user audio dropped before the model heard it (see append)
        self.duplex = self.layout.streams == 2
        self.max_lag_groups = max(1, round(settings.max_lag_s / self.layout.group_s))
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._rr = itertools.count()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="voxtral-engine", daemon=True)
        self.thread.start()

    # -- called from other threads -----------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread; its result or exception lands in the future."""
        fut: Future = Future()
        self._ops.put((fn, fut))
        return fut

    def feed(self, sid: str, pcm: np.ndarray | None, end: bool) -> Future:
        """Queue user audio (batched with the other conversations' on the thread); the
        future holds the number of ids the conversation holds after its prefill."""
        fut: Future = Future()
        self._ops.put(_Feed(sid, pcm, end, fut))
        return fut

    def alive(self) -> bool:
        """Whether the thread still runs (every conversation depends on it)."""
        return self.thread.is_alive() and not self._stop.is_set()

    def shutdown(self) -> None:
        """Stop the thread and wait for it (at most 5 s); calling it again does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._ops.put((lambda: None, Future()))  # wake it if it waits for work
        self.thread.join(timeout=5)

    # -- on the engine thread ----------------------------------------------------------
    def conversation(self, sid: str) -> Conversation:
        try:
            return self.convs[sid]
        except KeyError:
            raise UnknownSession(sid) from None

    def new_conversation(self, sid: str) -> Conversation:
        return Conversation(
            sid=sid,
            state=self.engine.new_state(),
            encoder=CodecStreamEncoder(self.codec, self.s.encoder_context_frames),
            audio_out=CodecStreamDecoder(self.codec, self.s.decoder_context_frames),
            held_frames=np.zeros((self.layout.vocab.n_q, 0), dtype=np.int64),
        )

    def begin_turn(self, c: Conversation, loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
        """Start the model's turn: the user's last partial group is padded and prefilled
        first; the turn's chunks go to ``out`` on ``loop``."""
        if c.held_frames.shape[1] or c.encoder.pending_samples:
            self._prefill(c, None, end=True)
        self._open_turn(c, loop, out)

    def _open_turn(self, c: Conversation, loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
        n = c.state.length
        c.turn = Turn(loop, out, n, StreamDecoder(self.layout, index=n), TextStream(self.tokenizer))
        c.audio_out.reset()

    def begin_stream(self, c: Conversation, loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
        """Full duplex: open the model's output for the conversation; each group of the
        user's audio from now on yields one group of the model's (to ``out`` on ``loop``)."""
        if c.turn is not None:
            raise RuntimeError("the conversation already streams")
        self._open_turn(c, loop, out)

    def restart(self, sid: str) -> None:
        """Forget the conversation (a new context). A half-duplex turn stops; a full-duplex
        output stream goes on, from the new context."""
        old = self.convs.get(sid)
        stream = old.turn if old is not None and self.duplex else None
        if stream is None:
            self.stop_turn(sid, "restart")
        c = self.convs[sid] = self.new_conversation(sid)
        if stream is not None:
            stream.decoder = StreamDecoder(self.layout, index=c.state.length)
            stream.text, stream.frames = TextStream(self.tokenizer), []
            c.turn = stream

    def stop_turn(self, sid: str, reason: str) -> None:
        """End the conversation's turn now (if it has one), telling its reader why."""
        c = self.convs.get(sid)
        if c is None or c.turn is None:
            return
        t, c.turn = c.turn, None
        c.last_turn = t
        t.ended = reason
        t.post({"end": reason, **t.stats()})

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = self._next_due_in()
            try:
                first = self._ops.get(timeout=timeout) if timeout != 0 else self._ops.get_nowait()
            except queue.Empty:
                first = None
            batch = [first] if first else []
            while True:
                try:
                    batch.append(self._ops.get_nowait())
                except queue.Empty:
                    break
            feeds = [op for op in batch if isinstance(op, _Feed)]
            for op in batch:
                if isinstance(op, _Feed):
                    continue
                fn, fut = op
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

    # -- user audio in -----------------------------------------------------------------
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
            elif c.turn is not None and not self.duplex:
                f.fut.set_exception(RuntimeError("the model is speaking; interrupt it first"))
            else:
                c.last_turn = None
                held = c.held_frames.shape[1]
                pcm = self._within_lag(c, f.pcm) if self.duplex else f.pcm
                staged.append((f, c, c.encoder.stage(pcm, f.end, fpg, held)))
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
                if whole and self.duplex:
                    self._queue_user(c, frames[:, :whole])
                elif whole:
                    ids = encode_ids(self.layout, frames[:, :whole], bos=False)
                    self._report_unheard(c, self.engine.append(c.state, ids.tolist()))
                if f.end:
                    c.encoder.reset()
                f.fut.set_result(len(c.user_groups) if self.duplex else c.state.length)
            except Exception as exc:  # this conversation's audio only
                f.fut.set_exception(exc)

    def _within_lag(self, c: Conversation, pcm: np.ndarray | None) -> np.ndarray | None:
        """Full duplex: of a burst longer than ``max_lag_s`` only its newest part is encoded
        (the rest would be dropped after encoding anyway), so one client's burst costs the
        engine thread, which every conversation shares, at most that much codec work."""
        keep = round(self.max_lag_groups * self.layout.group_s * self.codec.sample_rate)
        if pcm is None or len(pcm) <= keep:
            return pcm
        self._drop(c, (len(pcm) - keep) / self.codec.sample_rate)
        return pcm[len(pcm) - keep :]

    def _queue_user(self, c: Conversation, frames: np.ndarray) -> None:
        """Full duplex: whole groups of user frames wait for the model's next steps; past
        ``max_lag_s`` the oldest are dropped unheard (the model fell behind the microphone)."""
        groups = frames.shape[1] // self.layout.frames_per_group
        c.user_groups.extend(audio_slot_ids(self.layout, frames, groups).tolist())
        late = len(c.user_groups) - self.max_lag_groups
        if late > 0:
            for _ in range(late):
                c.user_groups.popleft()
            self._drop(c, late * self.layout.group_s)

    def _drop(self, c: Conversation, seconds: float) -> None:
        self.unheard_s += seconds
        c.dropped_s += seconds
        log.warning(
            "session %s: the model fell behind; %.2f s of user audio dropped", c.sid, seconds
        )

    def _report_unheard(self, c: Conversation, dropped_ids: int) -> None:
        """User audio that arrived faster than the context holds lost its oldest part."""
        if dropped_ids:
            seconds = dropped_ids / self.layout.group_len * self.layout.group_s
            self.unheard_s += seconds
            log.warning(
                "session %s: more user audio came at once than the context holds (%d ids): "
                "its oldest %.1f s were dropped unheard",
                c.sid,
                self.engine.max_context,
                seconds,
            )

    # -- model audio out ---------------------------------------------------------------
    def _due(self, t: Turn, now: float) -> bool:
        return t.audio_s < (now - t.t0) + self.s.lead_s

    def _next_due_in(self) -> float | None:
        if self.duplex:  # the microphone is the clock: due as soon as a user group waits
            return 0.0 if any(self._due_duplex(c) for c in self.convs.values()) else None
        turns = [c.turn for c in self.convs.values() if c.turn is not None]
        if not turns:
            return None
        now = time.monotonic()
        wait = min(t.audio_s - (now - t.t0) - self.s.lead_s for t in turns)
        return max(0.0, min(wait, 0.05))

    @staticmethod
    def _due_duplex(c: Conversation) -> bool:
        return c.turn is not None and bool(c.user_groups)

    def _step(self) -> None:
        now = time.monotonic()
        if self.duplex:
            due = [c for c in self.convs.values() if self._due_duplex(c)]
        else:
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
            given = [c.user_groups[0] for c in convs] if self.duplex else None
            out = self.engine.generate_group([c.state for c in convs], given)
            for c in convs if self.duplex else ():
                c.user_groups.popleft()
            return list(zip(convs, out, strict=True))
        except Exception:
            if len(convs) == 1:
                log.exception("generation failed for session %s", convs[0].sid)
                self.stop_turn(convs[0].sid, "error")
                convs[0].user_groups.clear()
                return [(convs[0], None)]
        # one conversation broke the batch: find it, keep the others going
        return [pair for c in convs for pair in self._generate([c])]

    def _take_group(self, c: Conversation, ids: list[int]) -> None:
        t = c.turn
        frames, text_ids = t.decoder.push(ids)  # the user's frames (2 streams) are not sent
        t.groups += 1
        t.frames.append(frames)
        t.pending_text += t.text.push(text_ids)
        if self.duplex:  # the output stream lasts the conversation
            return
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
            if c.dropped_s:
                item["dropped_s"], c.dropped_s = round(c.dropped_s, 4), 0.0
            t.post(item)
            if t.ended is not None:
                c.turn, c.last_turn = None, t
                t.post({"end": t.ended, **t.stats()})
