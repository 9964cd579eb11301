"""The duplex session's half-duplex turn end: a VAD on the model's own output ends its turn
once it has spoken and then gone quiet (``serve.turn_end_silence_ms``). A real
``HalfDuplexSession`` and real silero VAD, over a scripted ``LMClient`` (no model, no Ray)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import serve_client as C  # tests/ helper shared with test_serve.py

from serve_app import protocol as P
from serve_app.audio_io import SAMPLE_RATE, make_wire_audio
from serve_app.half_duplex import HalfDuplexSession
from serve_app.session import SessionSettings
from serve_app.vad import OutputEnd

CHUNK = round(0.08 * SAMPLE_RATE)  # the engine's default chunk (serve.chunk_ms)
SILENCE_MS = 500.0
SETTINGS = SessionSettings(turn_end_silence_ms=SILENCE_MS)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return C.speech_clip(tmp_path_factory.mktemp("speech"))  # 1.6 s, speech to its end


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), np.float32)


def noise(seconds: float, amp: float = 0.05) -> np.ndarray:
    """Audible, but not speech to silero (its probability stays under 0.05)."""
    rng = np.random.default_rng(0)
    return (amp * rng.standard_normal(round(seconds * SAMPLE_RATE))).astype(np.float32)


class ScriptedLM:
    """``LMClient`` whose turns are given audio, streamed in engine-sized chunks and then
    ended with ``max_turn`` as the engine would; it records what each turn yielded and
    whether it was closed before its end."""

    def __init__(self, turns: list[np.ndarray]):
        self.turns = list(turns)
        self.yielded_s: list[float] = []
        self.closed_early: list[bool] = []

    async def open(self) -> dict[str, Any]:
        return {}

    async def feed(self, pcm: np.ndarray) -> int:
        return 0

    async def end_turn(self) -> int:
        return 0

    async def respond(self) -> AsyncGenerator[dict[str, Any], None]:
        audio, finished = self.turns.pop(0), False
        self.yielded_s.append(0.0)
        try:
            for i in range(0, len(audio), CHUNK):
                self.yielded_s[-1] += len(audio[i : i + CHUNK]) / SAMPLE_RATE
                yield {"audio": audio[i : i + CHUNK]}
            finished = True
            yield {"end": "max_turn", "audio_s": len(audio) / SAMPLE_RATE}
        finally:
            self.closed_early.append(not finished)

    async def interrupt(self, heard_s: float) -> dict[str, Any]:
        raise AssertionError("nothing here interrupts the model")

    async def restart(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Client:
    """What the session sent, decoded."""

    def __init__(self):
        self.messages: list[bytes] = []

    async def __call__(self, m: bytes) -> None:
        self.messages.append(m)

    def events(self, name: str) -> list[dict[str, Any]]:
        evs = [json.loads(m[1:]) for m in self.messages if m[0] == P.Kind.METADATA]
        return [e for e in evs if e["event"] == name]

    def audio_s(self) -> float:
        """Seconds of PCM16 audio received."""
        return sum(len(m) - 1 for m in self.messages if m[0] == P.Kind.AUDIO) / 2 / SAMPLE_RATE


async def until(predicate, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def model_turns(lm: ScriptedLM, pool=None) -> tuple[HalfDuplexSession, Client]:
    """Run each of ``lm``'s turns (the user ends theirs with END_TURN) to its ``turn_end``."""
    client = Client()
    s = HalfDuplexSession(lm, client, make_wire_audio("pcm16"), SETTINGS, audio_pool=pool)
    await s.start({})
    for k in range(1, len(lm.turns) + 1):
        await s.on_message(P.control(P.Control.END_TURN))
        await until(lambda k=k: len(client.events("turn_end")) == k and s.state == s.LISTENING)
    await s.flush()
    await s.close()
    return s, client


def test_output_silence_ends_the_turn(speech):
    """Speech, then silence: the turn ends ``turn_end_silence_ms`` (of output audio) after
    the speech, far before the model's own end; the stream was closed there, everything it
    yielded reached the client, and the session listens again."""
    lm = ScriptedLM([np.concatenate([speech, silence(8.0)])])
    s, client = asyncio.run(model_turns(lm))
    [end] = client.events("turn_end")
    assert end["reason"] == "silence", end
    speech_s, quiet_s = len(speech) / SAMPLE_RATE, SILENCE_MS / 1000
    assert speech_s + quiet_s - 0.1 <= end["audio_s"] <= speech_s + quiet_s + 0.3, end
    assert lm.closed_early == [True]
    assert lm.yielded_s[0] == pytest.approx(end["audio_s"], abs=1e-4)  # not a chunk more taken
    assert client.audio_s() == pytest.approx(end["audio_s"], abs=1e-4)  # all of it was sent
    assert [e["state"] for e in client.events("state")] == [
        "listening",
        "thinking",
        "speaking",
        "listening",
    ]
    assert s.state == s.LISTENING and s.pending_ops == 0


def test_output_without_a_pause_or_speech_runs_to_its_end(speech):
    """Speech to the end of the turn, then (the next turn) audible noise that is never
    speech: both run to the model's own end. The second also shows the output VAD is reset
    between turns: the first ended while it heard speech, so, carried over, the noise would
    count as the quiet after it."""
    lm = ScriptedLM([np.tile(speech, 3), noise(3.0)])
    _, client = asyncio.run(model_turns(lm))
    assert [e["reason"] for e in client.events("turn_end")] == ["max_turn", "max_turn"]
    assert lm.closed_early == [False, False]
    assert lm.yielded_s == pytest.approx([3 * len(speech) / SAMPLE_RATE, 3.0])


def test_output_vad_runs_in_the_audio_pool(speech, monkeypatch):
    """The output VAD (silero) runs in the session's audio pool, never on the event loop."""
    threads: list[str] = []
    push = OutputEnd.push

    def recording_push(self, pcm):
        threads.append(threading.current_thread().name)
        return push(self, pcm)

    monkeypatch.setattr(OutputEnd, "push", recording_push)
    lm = ScriptedLM([np.concatenate([speech, silence(1.0)])])
    with ThreadPoolExecutor(1, thread_name_prefix="test-audio") as pool:
        _, client = asyncio.run(model_turns(lm, pool))
    assert client.events("turn_end")[0]["reason"] == "silence"
    assert threads and all(t.startswith("test-audio") for t in threads), set(threads)
