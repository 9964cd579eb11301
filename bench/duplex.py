"""Turn-taking of the live voice endpoint, the Full-Duplex-Bench v1 way; prints one JSON line.

A stimulus (user turns with mid-turn pauses, silences after ends of turn, barge-in turns)
is streamed through ``/api/chat?codec=pcm16`` at real time, like a microphone: each 40 ms
message is sent once its 40 ms have passed. The model's audio is recorded as a client
with no jitter buffer plays it (``voxtral.turn_taking.playout``): each message from its
arrival (or when the audio queued before it has played), what is queued dropped at an
``interrupt`` event, as the browser client does (which also waits for a jitter-buffer
target first: its latencies are these plus that). Times count from the first sample of
the stimulus. Events, kinds and fields this script does not know are ignored, so it
measures a half-duplex server (VAD turns, barge-in) and a full-duplex one (which streams
audio all along) alike. silero-vad on that track gives the model's speech, and
``voxtral.turn_taking.score`` the figures (definitions there):

- ``takeover_pause``: share of the user's mid-turn pauses in which the model took the floor
  (its speech there spans at least ``min_takeover_s``, 1 s, FDB's rule without the word
  count). Lower is better.
- ``takeover_turn``: the same after the user's ends of turn (up to their next onset);
  higher is better. ``turn_latency_ms_p50`` (and ``_mean``, what FDB reports): end of
  turn to the model's speech onset, over the turns it took.
- ``interrupt_stop_ms_p50``: from the onset of a barge-in turn to the end of the model's
  speech (gaps under 0.3 s bridged), over the barge-ins the model was speaking at
  (``interruptions_scored`` of ``interruptions``); FDB v1.5's stop latency.
  ``interrupt_takeover`` / ``interrupt_response_ms_p50``: FDB v1's user-interruption TOR
  and latency, the model's answer after the barge-in turn ends.
- ``rtf``: wall seconds per second of model audio while it streams, seen by the client:
  the audio messages are cut into bursts (model turns: more than 1 s apart, or an
  ``interrupt`` between them), and each burst's time from its first message to its last
  is divided by its audio after the first (``voxtral.turn_taking.stream_rtf``). About 1
  (or below, for a server that runs ahead): the audio arrives as fast as it plays;
  above 1: the listener hears gaps. It works for a half-duplex server's turns and a
  full-duplex server's one stream alike. ``server_rtf``: the server's own processing
  ratio (engine-busy seconds per second of audio generated) from the ``turn_end``
  events that report it, null when there are none (an interrupted turn reports none).

The baseline is an oracle measured in the same run: a perfect agent's answer to the same
stimulus (silent in the pauses, speaking from the very end of each turn, stopping exactly
at each barge-in onset), scored through the same VAD and windows (``oracle_*``). Its rates
are the ideal ones (0 and 1) and its latencies are what the measurement itself adds (the
VAD's onset and offset lag): a model's own reaction time is its latency minus the
oracle's. A ratio to them would divide by that lag, so the figures stand beside it.

Context keys: ``stimulus_s``, the event counts, ``model_audio_s`` (audio received),
``model_speech_s`` (what the VAD called speech in the played track), ``server_interrupts``,
``server_turns``, ``errors`` (0x05 messages), ``send_late_ms_max`` (how far this client
fell behind real time: figures are suspect when it is large), ``session_s``.

    uv run bench/duplex.py                 # starts the local profile's endpoint (tiny model)
    uv run bench/duplex.py --url http://127.0.0.1:8000     # an endpoint already up
    uv run bench/duplex.py --wav talk.wav  # your stimulus; its annotations in talk.json
    uv run bench/duplex.py --quick         # one episode (~15 s) for the test suite

The token, when the server wants one: ``VOXTRAL_SERVE__TOKEN`` (or ``--set serve.token=``).
``--keep DIR`` writes the stimulus, the played model track and the annotations there.
A ``--wav`` sidecar (``PATH`` with ``.json``) holds ``{"turns": [{"start_s", "end_s",
"barge_in"}], "pauses": [[start_s, end_s]]}`` in seconds of the WAV.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from voxtral.config import REPO_ROOT, add_config_args, config_from_args  # noqa: E402
from voxtral.turn_taking import (  # noqa: E402
    MIN_TAKEOVER_S,
    Annotations,
    TurnSpec,
    build_stimulus,
    oracle_track,
    playout,
    score,
    server_rtf,
    stream_rtf,
    vad_segments,
)

RATE = 24_000
CHUNK = 960  # 40 ms per message, as a microphone delivers it
SAMPLE = REPO_ROOT / "data" / "sample"
USER_VOICE = ("podcast_en.ogg", "podcast_en.rttm")
ORACLE_VOICE = ("interview_en.mp3", "interview_en.rttm")


# -- the stimulus -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def decode(path: Path) -> np.ndarray:
    from voxtral.media import decode_stream

    return np.concatenate(list(decode_stream(str(path), RATE))).astype(np.float32)


def clauses(media: str, rttm: str, min_s: float = 1.0, max_s: float = 3.0) -> list[np.ndarray]:
    """The clauses of a sample dialogue that no one else speaks over, at 24 kHz. The sample
    corpus places each clause on its timeline exactly (data/sample/make_sample.py), so a
    clause starts and ends with its speech."""
    from voxtral.diarize.turns import read_rttm

    audio = decode(SAMPLE / media)
    turns = read_rttm(str(SAMPLE / rttm))
    out = []
    for t in turns:
        alone = all(
            o is t or o.end_s <= t.start_s - 0.05 or o.start_s >= t.end_s + 0.05 for o in turns
        )
        if alone and min_s <= t.end_s - t.start_s <= max_s:
            out.append(audio[round(t.start_s * RATE) : round(t.end_s * RATE)])
    return out


def sample_stimulus(episodes: int, quick: bool) -> tuple[np.ndarray, Annotations]:
    """``episodes`` times: a turn of two clauses with a 2 s pause between them, 3 s of
    silence (the model should answer), a one-clause barge-in turn (it should stop, then
    answer that), then silence until the next episode (6 s) or the end."""
    pieces = itertools.cycle(clauses(*USER_VOICE))
    specs = []
    for e in range(episodes):
        gap = (0.5 if quick else 1.0) if e == 0 else 6.0
        specs.append(TurnSpec((next(pieces), next(pieces)), gap_before_s=gap, pause_s=2.0))
        specs.append(TurnSpec((next(pieces),), gap_before_s=3.0, barge_in=True))
    return build_stimulus(specs, RATE, tail_s=4.0 if quick else 6.0)


def wav_stimulus(path: Path) -> tuple[np.ndarray, Annotations]:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise SystemExit(f"--wav {path}: its annotations {sidecar} are missing (see --help)")
    audio = decode(path)
    return audio, Annotations.from_json(json.loads(sidecar.read_text()), len(audio) / RATE)


# -- the live session -------------------------------------------------------------------------
async def live_session(url: str, token: str | None, stimulus: np.ndarray) -> dict:
    """Stream ``stimulus`` at real time; record every audio message (arrival time, samples)
    and ``interrupt`` event time, in seconds from the stimulus's first sample (audio that
    came before it, from a server that streams from the start, is at 0)."""
    import websockets

    from serve_app import protocol as P
    from serve_app.audio_io import float_to_pcm16, pcm16_to_float

    query = "?codec=pcm16" + (f"&token={quote(token, safe='')}" if token else "")
    ws_url = url.replace("http", "ws", 1).rstrip("/") + "/api/chat" + query
    rec = {"chunks": [], "drops": [], "turns": [], "errors": [], "late": 0.0}
    ready = asyncio.Event()

    async with websockets.connect(ws_url, max_size=None, open_timeout=60) as ws:

        async def receive() -> None:
            async for m in ws:
                t = time.monotonic()
                if isinstance(m, str) or not m:
                    continue
                kind, payload = m[0], m[1:]
                if kind == P.Kind.HANDSHAKE:
                    ready.set()
                elif kind == P.Kind.AUDIO:
                    rec["chunks"].append((t, pcm16_to_float(payload)))
                elif kind == P.Kind.ERROR:
                    rec["errors"].append(payload.decode("utf-8", "replace"))
                elif kind == P.Kind.METADATA:
                    try:
                        ev = json.loads(payload)
                    except ValueError:
                        continue
                    name = ev.get("event") if isinstance(ev, dict) else None
                    if name == "interrupt":
                        rec["drops"].append(t)
                    elif name == "turn_end":
                        rec["turns"].append(ev)
                # anything else (text, pings, other events, new kinds): not needed here

        task = asyncio.ensure_future(receive())
        await asyncio.wait_for(ready.wait(), 60)
        start = time.monotonic()
        try:
            for i in range(0, len(stimulus), CHUNK):
                due = start + (i + CHUNK) / RATE  # a microphone hands over 40 ms once heard
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                rec["late"] = max(rec["late"], time.monotonic() - due)
                if task.done():
                    break
                await ws.send(P.audio(float_to_pcm16(stimulus[i : i + CHUNK])))
        except websockets.ConnectionClosed:
            pass
        rec["session_s"] = time.monotonic() - start
        if task.done() or ws.close_code is not None:  # the server ended the session
            why = task.exception() if task.done() else None  # (retrieved: no warning)
            raise RuntimeError(
                f"the server closed the session after {rec['session_s']:.1f} s "
                f"({ws.close_code} {ws.close_reason!r}, {why!r}); its errors: {rec['errors']}"
            )
        task.cancel()
    rec["chunks"] = [(t - start, pcm) for t, pcm in rec["chunks"]]
    rec["drops"] = [t - start for t in rec["drops"]]
    return rec


# -- scoring ----------------------------------------------------------------------------------
def figures(rec: dict, stimulus: np.ndarray, ann: Annotations, keep: Path | None) -> dict:
    track = playout(rec["chunks"], rec["drops"], RATE, ann.duration_s)
    model = vad_segments(track, RATE)
    live = score(model, ann)
    oracle_speech = np.concatenate(clauses(*ORACLE_VOICE, max_s=10.0))
    oracle = oracle_track(ann, oracle_speech, RATE)
    ideal = score(vad_segments(oracle, RATE), ann)
    arrivals = [(t, len(pcm)) for t, pcm in rec["chunks"]]
    if keep is not None:
        import soundfile as sf

        keep.mkdir(parents=True, exist_ok=True)
        sf.write(keep / "stimulus.wav", stimulus, RATE)
        sf.write(keep / "model.wav", track, RATE)
        sf.write(keep / "oracle.wav", oracle, RATE)
        (keep / "stimulus.json").write_text(json.dumps(ann.to_json(), indent=1))
        (keep / "model_speech.json").write_text(json.dumps(model))
    events = ("pauses", "turn_ends", "interruptions", "interruptions_scored")
    return {
        "takeover_pause": live["takeover_pause"],
        "takeover_turn": live["takeover_turn"],
        "turn_latency_ms_p50": live["turn_latency_ms_p50"],
        "interrupt_stop_ms_p50": live["interrupt_stop_ms_p50"],
        "rtf": stream_rtf(arrivals, rec["drops"], RATE),
        "server_rtf": server_rtf(rec["turns"]),
        "turn_latency_ms_mean": live["turn_latency_ms_mean"],
        "interrupt_takeover": live["interrupt_takeover"],
        "interrupt_response_ms_p50": live["interrupt_response_ms_p50"],
        **{f"oracle_{k}": v for k, v in ideal.items() if k not in events},
        "stimulus_s": round(ann.duration_s, 2),
        **{k: live[k] for k in events},
        "model_audio_s": round(sum(len(c) for _, c in rec["chunks"]) / RATE, 2),
        "model_speech_s": round(sum(b - a for a, b in model), 2),
        "server_interrupts": len(rec["drops"]),
        "server_turns": len(rec["turns"]),
        "errors": len(rec["errors"]),
        "send_late_ms_max": round(rec["late"] * 1000, 1),
        "session_s": round(rec["session_s"], 2),
        "min_takeover_s": MIN_TAKEOVER_S,
    }


def main(argv=None) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--url", help="measure this running endpoint instead of starting one")
    parser.add_argument("--wav", type=Path, help="stimulus WAV; annotations in its .json")
    parser.add_argument("--episodes", type=int, default=4, help="pause/turn/barge-in rounds")
    parser.add_argument("--keep", type=Path, help="write the audio and annotations here")
    parser.add_argument("--quick", action="store_true", help="one episode, about 15 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes = 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="voxtral-bench-"))
    args.overrides = [f"storage.root={root}", *args.overrides]
    cfg = config_from_args(args)
    if args.wav:
        stimulus, ann = wav_stimulus(args.wav)
    else:
        stimulus, ann = sample_stimulus(args.episodes, args.quick)

    from bench.serve import endpoint

    try:
        with endpoint(cfg, args.url) as (url, info):
            rec = asyncio.run(live_session(url, cfg.serve.token, stimulus))
        result = {
            **figures(rec, stimulus, ann, args.keep),
            "endpoint": "url" if args.url else "local",
            "model_source": info.get("model_source"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
