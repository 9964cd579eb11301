"""voxtral/turn_taking.py (Full-Duplex-Bench-style scores from speech segments) and
bench/duplex.py run as a user types it against the test server."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager, suppress

import numpy as np
import pytest

from voxtral.turn_taking import (
    Annotations,
    TurnSpec,
    UserTurn,
    build_stimulus,
    floor_taken,
    merge,
    oracle_track,
    playout,
    score,
    segments_from_flags,
    server_rtf,
    stop_latency,
    stream_rtf,
    vad_segments,
)

RATE = 1000  # the pure functions do not care; small numbers keep the arithmetic exact

# A stimulus of 20 s: turn 1 (1–5 s) with a pause at 2–3 s, a turn end at 5 s; turn 2, a
# barge-in, at 8–9 s; its answer window 9–20 s.
ANN = Annotations(
    20.0,
    (UserTurn(1.0, 5.0), UserTurn(8.0, 9.0, barge_in=True)),
    ((2.0, 3.0),),
)


# -- the rule, event by event ------------------------------------------------------------------
def test_floor_taken_needs_a_second_of_speech_inside_the_window():
    assert floor_taken([], 2.0, 3.0) is None
    assert floor_taken([(2.2, 2.9)], 2.0, 3.0) is None  # 0.7 s: a backchannel, not a turn
    assert floor_taken([(2.2, 3.4)], 2.0, 3.0) == pytest.approx(0.2)  # runs past the window
    assert floor_taken([(2.2, 2.5), (2.9, 3.3)], 2.0, 3.0) == pytest.approx(0.2)  # span 1.1 s
    assert floor_taken([(3.0, 5.0)], 2.0, 3.0) is None  # begins after the window
    assert floor_taken([(0.0, 1.9)], 2.0, 3.0) is None  # ended before it
    assert floor_taken([(1.0, 3.5)], 2.0, 3.0) == 0.0  # already speaking: counted from 2 s
    assert floor_taken([(1.0, 2.5)], 2.0, 3.0) is None  # only 0.5 s of it inside
    assert floor_taken([(2.5, 3.0)], 2.0, 3.0, min_s=0.5) == pytest.approx(0.5)


def test_stop_latency_is_the_end_of_the_run_covering_the_onset():
    assert stop_latency([(7.0, 8.25)], 8.0) == pytest.approx(0.25)
    assert stop_latency([(7.0, 7.9)], 8.0) is None  # already quiet: not scored
    assert stop_latency([(7.0, 8.0)], 8.0) == 0.0  # stopped right as the user began
    assert stop_latency([(8.1, 9.0)], 8.0) is None  # began after the user did
    # a breath (0.2 s) does not end the run; a real silence (0.5 s) does
    assert stop_latency([(7.0, 8.1), (8.3, 8.6)], 8.0) == pytest.approx(0.6)
    assert stop_latency([(7.0, 8.1), (8.6, 9.0)], 8.0) == pytest.approx(0.1)


def test_merge_and_segments_from_flags():
    assert merge([(3.0, 4.0), (0.0, 1.0), (1.2, 2.0)], 0.3) == [(0.0, 2.0), (3.0, 4.0)]
    flags = np.array([0, 1, 1, 0, 0, 1, 0, 1], bool)
    assert segments_from_flags(flags, 0.5) == [(0.5, 1.5), (2.5, 3.0), (3.5, 4.0)]
    assert segments_from_flags(np.zeros(4, bool), 0.5) == []


# -- the figures, model by model ---------------------------------------------------------------
def test_a_model_that_speaks_in_the_pause_takes_it_over():
    out = score([(2.3, 3.4)], ANN)
    assert out["takeover_pause"] == 1.0 and out["pauses"] == 1
    assert score([(2.3, 2.6)], ANN)["takeover_pause"] == 0.0  # too short to count


def test_a_polite_model_waits_then_answers_and_yields():
    # answers 0.4 s after the end of turn, is cut by the barge-in at 8 s 0.3 s later,
    # answers the interruption 0.6 s after it ends
    polite = [(5.4, 8.3), (9.6, 12.0)]
    out = score(polite, ANN)
    assert out["takeover_pause"] == 0.0
    assert out["takeover_turn"] == 1.0 and out["turn_ends"] == 1
    assert out["turn_latency_ms_p50"] == 400.0 and out["turn_latency_ms_mean"] == 400.0
    assert out["interrupt_stop_ms_p50"] == 300.0
    assert out["interruptions"] == out["interruptions_scored"] == 1
    assert out["interrupt_takeover"] == 1.0 and out["interrupt_response_ms_p50"] == 600.0


def test_a_silent_model_scores_no_takeover_and_no_latency():
    out = score([], ANN)
    assert out["takeover_pause"] == 0.0 and out["takeover_turn"] == 0.0
    assert out["turn_latency_ms_p50"] is None and out["interrupt_stop_ms_p50"] is None
    assert out["interruptions_scored"] == 0 and out["interrupt_takeover"] == 0.0


def test_a_model_that_talks_over_everything():
    out = score([(0.0, 20.0)], ANN)
    assert out["takeover_pause"] == 1.0 and out["takeover_turn"] == 1.0
    assert out["turn_latency_ms_p50"] == 0.0  # already speaking at the end of turn
    assert out["interrupt_stop_ms_p50"] == 12000.0  # never stopped: to the end


def test_latency_percentiles_over_several_turns():
    ann = Annotations(
        30.0, (UserTurn(1.0, 2.0), UserTurn(6.0, 7.0), UserTurn(12.0, 13.0), UserTurn(20, 21))
    )
    model = [(2.2, 4.0), (7.5, 9.0), (13.3, 13.8), (21.9, 25.0)]  # the third is too short
    out = score(model, ann)
    assert out["takeover_turn"] == 0.75
    assert out["turn_latency_ms_p50"] == 500.0  # of 200, 500, 900
    assert out["turn_latency_ms_mean"] == pytest.approx(533.3)
    assert out["takeover_pause"] is None and out["interrupt_stop_ms_p50"] is None


def test_stream_rtf_over_bursts_of_audio():
    one = RATE // 10  # 0.1 s per message
    # a turn of 11 messages, 0.1 s apart: real time (1.0); the silence after it is not counted
    turn = [(1.0 + 0.1 * k, one) for k in range(11)]
    assert stream_rtf(turn, [], RATE) == 1.0
    # a second turn much later, twice as slow: (1 + 2) s for (1 + 1) s of audio
    slow = [(20.0 + 0.2 * k, one) for k in range(11)]
    assert stream_rtf(turn + slow, [], RATE) == 1.5
    # an interrupt splits a burst: the wait across it is not counted
    cut = [(1.0, one), (1.1, one), (1.5, one), (1.6, one)]
    assert stream_rtf(cut, [1.2], RATE) == 1.0
    assert stream_rtf(cut, [], RATE) == pytest.approx(0.6 / 0.3)
    assert stream_rtf([(1.0, one)], [], RATE) is None


def test_server_rtf_from_its_turn_ends():
    stats = [{"audio_s": 2.0, "busy_s": 1.0, "wall_s": 2.1}, {"audio_s": 2.0, "busy_s": 2.0}]
    assert server_rtf(stats) == 0.75
    assert server_rtf([{"audio_s": 1.0}, {"reason": "eos"}]) is None


# -- the stimulus, the playback model, the oracle ------------------------------------------------
def test_build_stimulus_annotates_what_it_builds():
    a, b, c = (np.full(n, v, np.float32) for n, v in ((1500, 0.1), (1000, 0.2), (500, 0.3)))
    specs = [
        TurnSpec((a, b), gap_before_s=1.0, pause_s=2.0),
        TurnSpec((c,), gap_before_s=3.0, barge_in=True),
    ]
    audio, ann = build_stimulus(specs, RATE, tail_s=4.0)
    assert len(audio) == 1000 + 1500 + 2000 + 1000 + 3000 + 500 + 4000
    assert ann.duration_s == 13.0
    assert ann.turns == (UserTurn(1.0, 5.5), UserTurn(8.5, 9.0, barge_in=True))
    assert ann.pauses == ((2.5, 4.5),)
    assert np.all(audio[2500:4500] == 0) and np.all(audio[4500:5500] == 0.2)
    assert ann.windows() == [(5.5, 8.5, False, True), (9.0, 13.0, True, False)]
    assert Annotations.from_json(ann.to_json()) == ann


def test_annotations_refuse_what_cannot_be_scored():
    with pytest.raises(ValueError, match="ordered"):
        Annotations(10.0, (UserTurn(3.0, 4.0), UserTurn(2.0, 2.5)))
    with pytest.raises(ValueError, match="not inside a user turn"):
        Annotations(10.0, (UserTurn(1.0, 2.0),), ((2.5, 3.0),))


def test_playout_queues_chunks_and_drops_them_at_an_interrupt():
    one = np.ones(500, np.float32)
    # two chunks at 1 s play back to back; one at 5 s starts when it arrives
    track = playout([(1.0, one), (1.0, 2 * one), (5.0, 3 * one)], [], RATE, 8.0)
    assert track[999] == 0 and track[1000] == 1 and track[1500] == 2 and track[2000] == 0
    assert track[5000] == 3 and track[5499] == 3 and track[5500] == 0
    # an interrupt at 1.7 s drops what was queued and unplayed; later audio plays again
    track = playout([(1.0, one), (1.0, 2 * one), (5.0, 3 * one)], [1.7], RATE, 8.0)
    assert track[1699] == 2 and not track[1700:5000].any() and track[5000] == 3
    # audio beyond the duration is cut
    assert len(playout([(7.8, one)], [], RATE, 8.0)) == 8000


def test_oracle_answers_each_turn_and_stops_at_the_barge_in():
    speech = np.linspace(0.1, 1.0, 4000).astype(np.float32)
    track = oracle_track(ANN, speech, RATE, respond_s=2.0)
    assert not track[:5000].any()  # silent through the pause and the user's turn
    assert track[5000:8000].all() and not track[8000:9000].any()  # to the barge-in
    assert track[9000:11000].all() and not track[11000:].any()  # 2 s after turn 2
    assert out_of(score(segments_from_flags(track != 0, 1 / RATE), ANN)) == (0.0, 1.0, 0.0, 0.0)


def out_of(figures: dict) -> tuple:
    return (
        figures["takeover_pause"],
        figures["takeover_turn"],
        figures["turn_latency_ms_p50"],
        figures["interrupt_stop_ms_p50"],
    )


def test_vad_segments_find_speech_and_not_silence(tmp_path):
    import serve_client as C  # tests/ helper

    speech = C.speech_clip(tmp_path, seconds=1.6)
    audio = np.concatenate([np.zeros(24_000), speech, np.zeros(24_000)])
    segments = vad_segments(audio, 24_000)
    assert segments, "no speech found"
    assert 0.9 <= segments[0][0] <= 1.3 and 2.2 <= segments[-1][1] <= 2.9, segments
    assert vad_segments(np.zeros(48_000, np.float32), 24_000) == []


# -- bench/duplex.py against a scripted partner -----------------------------------------------
LEAD_S = 0.4  # the partner sends its audio this far ahead of playback, as the server does


@contextmanager
def scripted_partner(plan: list[tuple[float, float, bool]], speech: np.ndarray):
    """A stand-in endpoint that speaks the wire protocol (PCM16) and, whatever it hears,
    says ``speech`` over each ``(start, stop, cut)`` span of stimulus time (its clock set
    by the first message, which carries the stimulus's first 40 ms). Its audio runs
    ``LEAD_S`` ahead; for a ``cut`` span it has sent ``LEAD_S`` past ``stop`` when it sends
    an ``interrupt`` at ``stop``, so the client must drop that to stop in time. It also
    sends what a newer server might: an unknown event, an unknown kind, text, pings."""
    import serve_client as C  # tests/ helper
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    from serve_app import protocol as P
    from serve_app.audio_io import SAMPLE_RATE, float_to_pcm16

    chunk = 1920  # 80 ms

    async def session(ws):
        loop = asyncio.get_running_loop()
        await ws.send(P.handshake())
        await ws.send(P.metadata({"event": "ready", "codec": "pcm16"}))
        await ws.send(P.metadata({"event": "duplex_state", "model_stream": "on"}))
        await ws.send(bytes([0x07]) + b"a kind from a newer server")
        await ws.recv()
        t0 = loop.time() - 0.04

        async def discard() -> None:
            """Read what the client streams: unread, its messages would fill the queue and
            hide its close frame behind them (10 s of close timeout at the end)."""
            with suppress(ConnectionClosed):
                async for _ in ws:
                    pass

        drain = asyncio.ensure_future(discard())

        async def at(t: float) -> None:
            await asyncio.sleep(max(0.0, t0 + t - loop.time()))

        for start, stop, cut in plan:
            n = round((stop - start + (LEAD_S if cut else 0.0)) * SAMPLE_RATE)
            for j, k in enumerate(range(0, n, chunk)):
                await at(max(start, start + j * chunk / SAMPLE_RATE - LEAD_S))
                await ws.send(P.audio(float_to_pcm16(speech[k : min(k + chunk, n)])))
                await ws.send(P.ping())
            await ws.send(P.text("words "))
            if cut:
                await at(stop)
                await ws.send(P.metadata({"event": "interrupt", "heard_s": stop - start}))
        await ws.send(P.metadata({"event": "turn_end", "audio_s": 2.0, "busy_s": 0.5}))
        await drain

    def healthz(connection, request):
        if request.path == "/healthz":
            return connection.respond(200, '{"ok": true, "model_source": "scripted"}')
        return None

    port = C.free_port()
    loop = asyncio.new_event_loop()
    up, done = threading.Event(), asyncio.Event()

    async def main():
        async with serve(session, "127.0.0.1", port, max_size=None, process_request=healthz):
            up.set()
            await done.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert up.wait(30), "the scripted partner did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(30)


@pytest.mark.slow
def test_bench_duplex_scores_a_scripted_partner():
    """bench/duplex.py's ``--quick --url URL`` (in this process) against a partner whose
    behaviour is known: a 0.4 s backchannel in the pause (no takeover), an answer 0.5 s
    after the end of turn, cut by an interrupt 0.25 s into the barge-in (with 0.4 s more
    already sent, which the client must drop), an answer 0.4 s after the barge-in turn.
    Real speech, so the figures are what the script measures, within the VAD's lag and
    this machine's jitter; unknown kinds and events along the way are ignored."""
    from bench.duplex import ORACLE_VOICE, clauses, main, sample_stimulus

    _, ann = sample_stimulus(1, quick=True)
    (pause,), (a, b) = ann.pauses, ann.turns
    plan = [
        (pause[0] + 0.5, pause[0] + 0.9, False),
        (a.end_s + 0.5, b.start_s + 0.25, True),
        (b.end_s + 0.4, b.end_s + 2.4, False),
    ]
    speech = np.concatenate(clauses(*ORACLE_VOICE, max_s=10.0))
    with scripted_partner(plan, speech) as url:
        out = main(["--quick", "--url", url])
    assert out["errors"] == 0 and out["server_interrupts"] == 1, out
    assert out["takeover_pause"] == 0 and out["takeover_turn"] == 1, out
    assert out["interruptions_scored"] == 1 and out["interrupt_takeover"] == 1, out
    assert out["server_rtf"] == 0.25 and out["model_speech_s"] > 3, out
    assert out["model_source"] == "scripted", out
    if out["send_late_ms_max"] < 250:  # else this machine was too loaded to judge timing
        assert 450 <= out["turn_latency_ms_p50"] <= 750, out
        assert 200 <= out["interrupt_stop_ms_p50"] <= 550, out  # not 650: the queue went
        assert 350 <= out["interrupt_response_ms_p50"] <= 650, out


# -- bench/duplex.py against the test server -------------------------------------------------
@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory) -> str:
    import serve_client as C  # tests/ helper: the tiny model on the session's Ray, CPU

    return C.server_url(C.shared_root(tmp_path_factory))


@pytest.mark.slow
def test_bench_duplex_quick_prints_its_json_line(server):
    """``uv run bench/duplex.py --quick --url URL``, the token in the environment as the
    README's production checklist says: one JSON line with every key in range. The tiny
    model's voice is noise to silero, so its takeovers are 0 and its latencies null; the
    oracle, scored through the same VAD in the same run, shows the scoring finds speech."""
    import serve_client as C

    from tests.commands import json_line, user_env, uv_run

    env = user_env(VOXTRAL_SERVE__TOKEN=C.TOKEN)
    out = json_line(uv_run("bench/duplex.py", "--quick", "--url", server, env=env, timeout=240))
    keys = {"takeover_pause", "takeover_turn", "turn_latency_ms_p50", "interrupt_stop_ms_p50"}
    assert keys | {"rtf", "stimulus_s"} <= set(out), out
    assert out["pauses"] == out["turn_ends"] == out["interruptions"] == 1, out
    assert 13 <= out["stimulus_s"] <= 17 and out["errors"] == 0, out
    assert 0 <= out["takeover_pause"] <= 1 and 0 <= out["takeover_turn"] <= 1, out
    for key in ("turn_latency_ms_p50", "interrupt_stop_ms_p50", "interrupt_response_ms_p50"):
        assert out[key] is None or 0 <= out[key] <= 15_000, (key, out)
    assert out["model_audio_s"] > 0 and out["rtf"] is not None and 0 < out["rtf"] < 20, out
    # the oracle: never in the pause, always after the turn, stops at the barge-in
    assert out["oracle_takeover_pause"] == 0 and out["oracle_takeover_turn"] == 1, out
    assert out["oracle_interrupt_takeover"] == 1, out
    assert 0 <= out["oracle_turn_latency_ms_p50"] < 300, out
    assert 0 <= out["oracle_interrupt_stop_ms_p50"] < 300, out
    assert out["endpoint"] == "url" and out["model_source"] == "tiny-random", out
