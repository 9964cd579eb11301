"""Hostile clients against the voice endpoint: each case runs on the shared live server while a
polite session streams audio at real time, and must not touch it.

For every live case: the polite session's messages (pings count) never stop for more than
2 s, ``/healthz`` answers within 1 s, and the hostile session gets the promised 0x05 reply or
close code. Hostile sessions connect from other loopback addresses (127.0.0.x) so the
per-client limit sees them as other clients. The pure rules (admission, coalescing, rates)
and the parts a live server cannot be made to fail (a dead engine thread, a failing model
call) are tested in process on the real scheduler.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import serve_client as C  # tests/ helper shared with test_serve.py and test_browser.py
from serve_client import alongside, deaf_session, errors_of, hostile_client, settle, started
from websockets.exceptions import ConnectionClosed

from serve_app import protocol as P
from serve_app.audio_io import Pcm16Wire
from serve_app.half_duplex import HalfDuplexSession
from serve_app.limits import AudioBudget, SessionOverload, TokenBucket
from serve_app.outbox import Outbox
from serve_app.session import SessionSettings, keep_last
from voxtral.config import ConfigError, ServeConfig


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 24_000), dtype=np.float32)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_root(tmp_path_factory):
    return C.shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return C.speech_clip(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def server(ray_session, serve_root) -> str:
    return C.server_url(serve_root)


@pytest.fixture(scope="module")
def tiny(serve_root):
    """An in-process scheduler over the tiny export (what one SpeechLM replica holds)."""
    from serve_app.model_source import resolve_model
    from serve_app.scheduler import build_scheduler

    cfg = C.local_serve_config(serve_root)
    sched, _ = build_scheduler(cfg, resolve_model(cfg).describe())
    yield sched
    sched.shutdown()


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- live cases ----------------------------------------------------------------------------------
def test_deeply_nested_json_gets_an_error_and_the_session_goes_on(server):
    async def hostile():
        c = await hostile_client(server)
        assert await started(c)
        await c.ws.send(b"\x04" + b"[" * 100_000)
        assert await c.wait_for(lambda: c.of_kind(P.Kind.ERROR), 20)
        await c.ws.send(b"\x04" + b'{"a": [1, {"b": 2}]}')  # a fine one: no reply
        await c.ws.send(b"\x09")  # still parsed: another error, not a dead session
        assert await c.wait_for(lambda: len(c.of_kind(P.Kind.ERROR)) >= 2, 20)
        await asyncio.sleep(0.5)
        open_after = not c.closed.is_set()
        await c.ws.close()
        return c, open_after

    (c, open_after), w = run(alongside(server, hostile))
    w.check()
    errors = errors_of(c)
    assert open_after, errors
    assert "nested too deeply" in errors[0], errors
    assert "0x09" in errors[1], errors
    assert not any("ecursion" in e or "Traceback" in e for e in errors), errors


def test_control_flood_is_rate_limited_with_1008(server):
    from websockets.exceptions import ConnectionClosed

    async def hostile():
        c = await hostile_client(server, 3)
        assert await started(c)
        restart = P.control(P.Control.RESTART)
        t0 = time.monotonic()
        try:
            for _ in range(5000):
                if c.closed.is_set():
                    break
                await c.ws.send(restart)
        except ConnectionClosed:
            pass
        assert await c.wait_for(lambda: c.closed.is_set(), 30)
        return c, time.monotonic() - t0

    (c, took), w = run(alongside(server, hostile))
    w.check()
    assert c.close_code == 1008, (c.close_code, errors_of(c))
    assert any("messages per second" in e for e in errors_of(c)), errors_of(c)
    # the server stopped after the burst (2 s of 100/s) plus what the rate refilled
    assert len(c.events("restart")) <= 200 + 100 * took + 5, (len(c.events("restart")), took)


def test_restarts_under_the_rate_keep_the_session(server):
    """A burst of restarts under the limit is coalesced: the session stays open and usable."""

    async def hostile():
        c = await hostile_client(server, 4)
        assert await started(c)
        for _ in range(150):
            await c.ws.send(P.control(P.Control.RESTART))
        assert await c.wait_for(lambda: len(c.events("restart")) >= 150, 20)
        await c.ws.send(b"\x09")
        assert await c.wait_for(lambda: c.of_kind(P.Kind.ERROR), 10)
        open_after = not c.closed.is_set()
        await c.ws.close()
        return c, open_after

    (c, open_after), w = run(alongside(server, hostile))
    w.check()
    assert open_after and len(c.events("restart")) == 150
    assert errors_of(c) == ["unknown message kind 0x09"]


def test_pings_do_not_keep_an_idle_session(server, serve_root):
    idle_s = C.local_serve_config(serve_root).serve.idle_timeout_s

    async def hostile():
        c = await hostile_client(server, 5)
        assert await started(c)
        t0 = time.monotonic()
        while not c.closed.is_set() and time.monotonic() - t0 < idle_s + 6:
            try:
                await c.ws.send(P.ping())
            except ConnectionClosed:  # the server's close, before our reader saw it
                break
            await asyncio.sleep(0.5)
        await c.wait_for(c.closed.is_set, 5)
        return c, time.monotonic() - t0

    (c, lasted), w = run(alongside(server, hostile))
    w.check()
    assert c.closed.is_set(), "pings kept the session open past the idle timeout"
    assert idle_s - 1 <= lasted <= idle_s + 3, lasted
    assert any("idle" in e for e in errors_of(c)) and c.close_code == 1000


def test_sessions_per_client_address_are_limited(server, serve_root):
    per_client = C.local_serve_config(serve_root).serve.max_sessions_per_client
    settle(server)

    async def hostile():
        clients = [await hostile_client(server, 6) for _ in range(per_client)]
        ok = [await started(c) for c in clients]
        extra = await hostile_client(server, 6)
        extra_started = await started(extra)
        await extra.wait_for(lambda: extra.closed.is_set(), 10)
        other = await hostile_client(server, 7)  # another address is not affected
        other_started = await started(other)
        before = (await asyncio.to_thread(C.healthz, server))["gateway_sessions"]
        await clients[0].ws.close()
        for _ in range(50):  # the gateway frees the slot once the session has ended
            await asyncio.sleep(0.2)
            if (await asyncio.to_thread(C.healthz, server))["gateway_sessions"] < before:
                break
        again = await hostile_client(server, 6)  # a freed slot can be used again
        again_started = await started(again)
        for c in [*clients[1:], other, again]:
            await c.ws.close()
        return ok, extra, extra_started, other_started, again_started

    (ok, extra, extra_started, other_started, again_started), w = run(alongside(server, hostile))
    w.check()
    assert all(ok) and other_started and again_started
    assert not extra_started and extra.close_code == 1008
    assert any("too many sessions" in e for e in errors_of(extra)), errors_of(extra)


def test_busy_refusal_leaves_no_routing_pin(server):
    h = settle(server)
    assert h["pinned_sessions"] == h["lm"]["sessions"], h

    async def hostile():
        clients, refused = [], []
        for i in range(20):  # fill the replica from two addresses, then be refused 3 times
            c = await hostile_client(server, 8 + i % 2)
            if await started(c):
                clients.append(c)
            else:
                await c.wait_for(lambda c=c: c.closed.is_set(), 10)
                refused.append(c)
                if len(refused) == 3:
                    break
        full = await asyncio.to_thread(C.healthz, server)
        for c in clients:
            await c.ws.close()
        return clients, refused, full

    (clients, refused, full), w = run(alongside(server, hostile))
    w.check()
    assert len(refused) == 3 and clients
    for c in refused:
        assert c.close_code == 1013 and any("busy" in e for e in errors_of(c)), errors_of(c)
    assert full["pinned_sessions"] == full["lm"]["sessions"], full  # no pin per refusal
    after = settle(server)
    assert after["pinned_sessions"] == after["lm"]["sessions"] == 0, after


def test_opus_bomb_is_refused_with_1008(server):
    """A decompression bomb (Opus pages of 2-byte packets of empty 2.5 ms frames: 76 s of
    audio in 16 KB; the old gateway decoded it all, then ran the VAD over it on its event
    loop) is refused before it is decoded: 0x05, then close 1008. An empty Opus packet (5 s
    of concealment to a decoder) is refused with a 0x05 and the session goes on."""

    async def hostile():
        c = await hostile_client(server, 11, codec="opus")
        assert await started(c)
        await c.ws.send(P.audio(C.opus_headers() + C.ogg_page([b""], 2)))
        assert await c.wait_for(lambda: c.of_kind(P.Kind.ERROR), 20)
        open_after_empty = not c.closed.is_set()
        bomb = C.opus_bomb(20, first_seq=3)
        assert len(bomb) < 16_500
        await c.ws.send(P.audio(bomb))
        assert await c.wait_for(lambda: c.closed.is_set(), 20)
        return c, open_after_empty

    (c, open_after_empty), w = run(alongside(server, hostile))
    w.check()
    errors = errors_of(c)
    assert open_after_empty and "empty Opus packet" in errors[0], errors
    assert c.close_code == 1008, (c.close_code, errors)
    assert any("ahead of real time" in e for e in errors[1:]), errors


def one_websocket_context(name: str) -> None:
    """Make this task's SpeechLM calls look like the Gateway's calls for one websocket:
    Serve gives them all the internal request id of that websocket's request."""
    from ray.serve.context import _set_request_context

    _set_request_context(request_id=name, _internal_request_id=name)


def hold_router_loop(seconds: float) -> None:
    """Block this process's Serve router loop (one thread routes every handle call of a
    process) for ``seconds``, so that the calls issued meanwhile all wait for a replica at
    once, as they do under load. A call must have been routed already (the loop exists)."""
    from ray.serve._private.router import SingletonThreadRouter

    loop = SingletonThreadRouter._asyncio_loop
    assert loop is not None, "no handle call was routed in this process yet"
    held = threading.Event()

    def hold() -> None:
        held.set()
        time.sleep(seconds)

    loop.call_soon_threadsafe(hold)
    assert held.wait(5)


def test_calls_of_one_websocket_at_once_are_all_routed(server):
    """Serve's router indexes the calls waiting for a replica by internal request id, which
    every call made for one websocket shares. Several at once (a cancelled operation and the
    close after it, under a control flood) left one never routed, and its routing task spun
    on the Gateway's router loop: every session stalled. ``HandleLM`` gives each call its
    own id; here eight at once from one websocket's context all complete."""
    from ray import serve

    from serve_app.speech_lm import HandleLM, call

    async def main() -> list:
        handle = serve.get_deployment_handle("SpeechLM", app_name="voxtral")
        await call(handle, "stats")
        one_websocket_context("one-websocket")
        lm = HandleLM(handle, "many")
        await lm.open()
        try:
            calls = [lm.restart() for _ in range(4)] + [lm.feed(silence(0.08)) for _ in range(4)]
            hold_router_loop(0.3)
            return await asyncio.wait_for(asyncio.gather(*calls), 20)
        finally:
            await lm.close()

    assert len(run(main())) == 8
    assert settle(server)["pinned_sessions"] == 0


def test_a_call_no_replica_takes_does_not_starve_the_router(server):
    """The router's side of the same fault: two calls that share an internal id (the raw
    handle, in one websocket's context) leave the second never routed; it must back off
    between tries, so that a call of another session is still routed at once."""
    from ray import serve

    from serve_app.speech_lm import call

    async def result(response):
        return await response

    async def main() -> tuple[float, int]:
        handle = serve.get_deployment_handle("SpeechLM", app_name="voxtral")
        await call(handle, "stats")
        one_websocket_context("shared-id")
        hold_router_loop(0.3)
        raw = [asyncio.ensure_future(result(handle.stats.remote())) for _ in range(2)]
        _, stuck = await asyncio.wait(raw, timeout=1.5)
        t0 = time.monotonic()
        await asyncio.wait_for(call(handle, "stats"), 10)
        took = time.monotonic() - t0
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        return took, len(stuck)

    took, stuck = run(main())
    assert stuck == 1, "the second call was routed: the case did not arise"
    assert took < 2.0, took


@pytest.mark.slow
def test_a_client_that_never_reads_loses_its_slot(server, speech):
    """A client that never reads its socket but keeps streaming speech (never idle; the
    model answers into its full buffers) loses its slot, and the polite session does not
    notice. Behind Ray Serve's proxy the Gateway's sends never block (the proxy holds what
    the client has not taken) and the proxy's websocket keep-alive (a ping every 20 s, 20 s
    for the pong) drops the client; where the Gateway's own sends block, its outbox does
    (``serve.send_timeout_s``, tested in process below)."""
    settle(server)
    clip = np.concatenate([silence(0.3), speech, silence(2.0)])
    deaf = alongside(server, lambda: deaf_session(server, 12, clip))
    (before, held, after, dropped_at), w = run(deaf, timeout=180)
    w.check()
    assert held == before + 1, (before, held)
    assert dropped_at is not None, "a client that never reads kept its connection for 60 s"
    assert after == before, (before, after, dropped_at)


# -- admission rules, in process -----------------------------------------------------------------
def _serve(**kw) -> ServeConfig:
    return ServeConfig(**kw)


@pytest.mark.parametrize(
    ("cfg", "headers", "token", "client", "refused"),
    [
        # a token server: non-browser clients (no Origin) work when they authenticate
        ({"token": "t0k"}, {"host": "h.example:8000"}, "t0k", "203.0.113.9", None),
        ({"token": "t0k"}, {"host": "h.example:8000"}, None, "203.0.113.9", "token"),
        ({"token": "t0k"}, {"host": "h.example:8000"}, "t0kx", "127.0.0.1", "token"),
        # browsers: their own page, a listed origin, or "*"
        (
            {"token": "t0k"},
            {"host": "h.example:8000", "origin": "http://h.example:8000"},
            "t0k",
            "203.0.113.9",
            None,
        ),
        (
            {"token": "t0k", "allowed_origins": ["https://app.example"]},
            {"host": "h.example:8000", "origin": "https://app.example"},
            "t0k",
            "203.0.113.9",
            None,
        ),
        (
            {"token": "t0k"},
            {"host": "h.example:8000", "origin": "https://evil.example"},
            "t0k",
            "203.0.113.9",
            "origin",
        ),
        (
            {"token": "t0k", "allowed_origins": ["*"]},
            {"host": "h.example:8000", "origin": "https://evil.example"},
            "t0k",
            "203.0.113.9",
            None,
        ),
        # no token: loopback only, by address and by Host (no DNS rebinding)
        ({}, {"host": "127.0.0.1:8000"}, None, "127.0.0.1", None),
        ({}, {"host": "localhost:8000", "origin": "http://localhost:8000"}, None, "::1", None),
        ({}, {"host": "10.0.0.2:8000"}, None, "10.0.0.7", "loopback"),
        ({}, {"host": "rebound.example:8000"}, None, "127.0.0.1", "loopback"),
        # explicitly anonymous: browsers from allowed origins, but scripts need an Origin
        (
            {"allow_anonymous": True},
            {"host": "10.0.0.2:8000", "origin": "http://10.0.0.2:8000"},
            None,
            "10.0.0.7",
            None,
        ),
        ({"allow_anonymous": True}, {"host": "10.0.0.2:8000"}, None, "10.0.0.7", "Origin"),
    ],
)
def test_admission_rules(cfg, headers, token, client, refused):
    from serve_app.gateway import refusal

    why = refusal(headers, token, client, _serve(**cfg))
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why, why


def test_unknown_codec_is_refused():
    from serve_app.gateway import refusal

    why = refusal({"host": "127.0.0.1:1"}, None, "127.0.0.1", _serve(), wire_format="mp3")
    assert why is not None and "codec" in why


def test_start_refuses_a_public_host_without_token(serve_root):
    """``deploy`` checks before Serve is touched (the jobs call it before Ray starts)."""
    from serve_app.app import deploy

    cfg = C.local_serve_config(serve_root, extra=["serve.host=0.0.0.0", "serve.token=null"])
    with pytest.raises(ConfigError, match="serve.allow_anonymous"):
        deploy(cfg)


def test_the_serve_application_holds_no_token(serve_root):
    """What ``serve.run`` ships (and Serve's REST API and dashboard show as deployment
    arguments) is the bound application: the token is not in it, in any form Serve keeps."""
    from ray import cloudpickle

    from serve_app.app import build_app

    token = "app-side-" + "a" * 32
    cfg = C.local_serve_config(serve_root, extra=[f"serve.token={token}"])
    assert token.encode() not in cloudpickle.dumps(build_app(cfg))


def test_message_rate_bucket():
    now = [0.0]
    rate = TokenBucket(10, 20, clock=lambda: now[0])
    assert sum(rate.allow() for _ in range(30)) == 20  # the burst, then nothing
    now[0] += 0.5
    assert sum(rate.allow() for _ in range(30)) == 5  # refilled at 10/s
    now[0] += 100
    assert sum(rate.allow() for _ in range(30)) == 20  # never above the burst


def test_audio_budget_allows_real_time_and_bursts_only():
    now = [0.0]
    budget = AudioBudget(1.5, 10.0, clock=lambda: now[0])
    for _ in range(3000):  # ten minutes at real time, 0.2 s messages
        now[0] += 0.2
        budget.admit(0.2)
    budget.admit(9.7)  # a burst (a client catching up after a stall)
    with pytest.raises(SessionOverload, match="ahead of real time"):
        budget.admit(0.5)
    now[0] += 1.0  # the budget refills at 1.5 × real time
    budget.admit(1.4)
    with pytest.raises(SessionOverload):
        budget.admit(60.0)  # one message more than the burst is refused whole


def test_keep_last():
    chunks = [np.arange(5), np.arange(5, 8), np.arange(8, 20)]
    assert np.concatenate(keep_last(chunks, 4)).tolist() == [16, 17, 18, 19]
    assert np.concatenate(keep_last(chunks, 16)).tolist() == list(range(4, 20))
    assert np.concatenate(keep_last(chunks, 99)).tolist() == list(range(20))
    assert keep_last([], 4) == [] and keep_last(chunks, 0) == []


# -- the session's queue and its errors, in process ----------------------------------------------
class Recorder:
    """A client's side of the socket: every message the session sent."""

    def __init__(self):
        self.messages: list[bytes] = []

    async def __call__(self, m: bytes) -> None:
        self.messages.append(m)

    def errors(self) -> list[str]:
        return [m[1:].decode() for m in self.messages if m[0] == P.Kind.ERROR]

    def events(self, name: str) -> list[dict]:
        evs = [json.loads(m[1:]) for m in self.messages if m[0] == P.Kind.METADATA]
        return [e for e in evs if e["event"] == name]


def test_restart_flood_is_coalesced(tiny):
    from serve_app.scheduler import LocalLM

    calls = {"restart": 0}

    class Counting(LocalLM):
        async def restart(self):
            calls["restart"] += 1
            await super().restart()

    async def main():
        out = Recorder()
        s = HalfDuplexSession(Counting(tiny, "flood"), out, Pcm16Wire())
        await s.start({})
        for _ in range(500):  # no await yields to the worker in between
            await s.on_message(P.control(P.Control.RESTART))
            assert s.pending_ops <= 1
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not s.pending_ops:
                break
        await asyncio.sleep(0.2)
        await s.close()
        return out

    out = asyncio.run(main())
    assert len(out.events("restart")) == 500 and not out.errors()
    assert 1 <= calls["restart"] <= 2  # one running, one queued: never 500 model calls


def test_session_queue_is_bounded(tiny):
    from serve_app.scheduler import LocalLM

    async def main():
        s = HalfDuplexSession(
            LocalLM(tiny, "bound"), Recorder(), Pcm16Wire(), SessionSettings(max_pending_ops=8)
        )  # not started: nothing drains the queue
        for _ in range(200):
            s._enqueue(("feed", silence(0.1)))
        assert s.pending_ops == 1  # merged into one feed of 20 s
        with pytest.raises(SessionOverload, match="audio waiting"):
            for _ in range(500):
                s._enqueue(("feed", silence(0.1)))
        for _ in range(7):
            s._enqueue(("end_turn",))
        with pytest.raises(SessionOverload, match="operations queued"):
            s._enqueue(("end_turn",))
        s._enqueue(("restart",))  # a restart always fits: it replaces what is queued
        assert s.pending_ops == 1

    asyncio.run(main())


async def _wait(predicate: Callable[[], Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def test_session_running_ahead_of_real_time_is_closed(tiny):
    """Audio faster than real time: bursts pass, then ``SessionOverload`` (the Gateway's 0x05
    and 1008); nothing past the budget is decoded."""
    from serve_app.scheduler import LocalLM

    now = [0.0]
    settings = SessionSettings(max_audio_rate=1.5, max_audio_ahead_s=4.0)

    async def main():
        wire = Pcm16Wire()
        s = HalfDuplexSession(
            LocalLM(tiny, "ahead"), Recorder(), wire, settings, clock=lambda: now[0]
        )
        await s.start({})
        for _ in range(20):  # 0.2 s of audio every 0.2 s: fine for as long as it lasts
            now[0] += 0.2
            await s.on_message(P.audio(wire.encode(silence(0.2))))
        await s.on_message(P.audio(wire.encode(silence(3.7))))  # a burst within the budget
        with pytest.raises(SessionOverload, match="4 s ahead of real time"):
            await s.on_message(P.audio(wire.encode(silence(1.0))))
        await s.close()

    asyncio.run(main())


def test_preroll_is_bounded_in_ms(tiny):
    """A session that is not in a user turn keeps ``preroll_ms`` (+ the onset) of audio, not
    the whole of a long message."""
    from serve_app.scheduler import LocalLM

    settings = SessionSettings(preroll_ms=300, start_ms=96, max_audio_ahead_s=60)

    async def main():
        wire = Pcm16Wire()
        s = HalfDuplexSession(LocalLM(tiny, "preroll"), Recorder(), wire, settings)
        await s.start({})
        await s.on_message(P.audio(wire.encode(silence(20.0))))
        held = sum(map(len, s._preroll))
        await s.on_message(P.audio(wire.encode(silence(0.01))))
        await s.close()
        return held, sum(map(len, s._preroll))

    held, after_small = asyncio.run(main())
    assert held == after_small == round(0.396 * 24_000)


def test_audio_work_leaves_the_event_loop_free(tiny):
    """Decoding and VAD run in the session's audio pool: while one session's 60 s message is
    decoded and run through the VAD (most of a second of CPU), the event loop that every
    session shares keeps ticking."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.scheduler import LocalLM

    settings = SessionSettings(max_audio_ahead_s=120)
    # 60 s: 30 s took 0.196 s once on an idle machine, under the 0.2 s that makes this a test
    noise = np.random.default_rng(0).normal(0, 0.1, 60 * 24_000).astype(np.float32)
    lags: list[float] = []

    async def tick(stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - t - 0.005)

    async def main() -> float:
        wire = Pcm16Wire()
        with ThreadPoolExecutor(2) as pool:
            s = HalfDuplexSession(
                LocalLM(tiny, "pool"), Recorder(), wire, settings, audio_pool=pool
            )
            await s.start({})
            stop = asyncio.Event()
            ticker = asyncio.ensure_future(tick(stop))
            t0 = time.monotonic()
            await s.on_message(P.audio(wire.encode(noise)))
            took = time.monotonic() - t0
            stop.set()
            await ticker
            await s.close()
        return took

    took = asyncio.run(main())
    print(f"60 s message: {took:.2f} s of work, longest event-loop lag {max(lags):.3f} s")
    assert took > 0.2, took  # real work, or this test proves nothing
    # inline, the loop would stall for all of it; in the pool, for GIL hand-overs only
    assert max(lags) < took / 3, (max(lags), took)


def test_outbox_fails_when_the_client_stops_reading():
    """Sends that never complete (a client that stopped reading, full socket buffers): the
    session keeps queuing without waiting, and after ``timeout_s`` the outbox has failed."""
    written: list[bytes] = []
    gate = asyncio.Event()

    async def send(m: bytes) -> None:
        if m == b"stuck":
            await gate.wait()  # never set: the socket does not drain
        written.append(m)

    async def main():
        box = Outbox(send, timeout_s=0.3)
        for m in (b"a", b"b"):
            box.put(m)
        assert await box.flush() and written == [b"a", b"b"]  # in order
        t0 = time.monotonic()
        box.put(b"stuck")
        for _ in range(100):
            box.put(b"more")  # never waits
        assert time.monotonic() - t0 < 0.05
        await _wait(lambda: box.failed is not None, 5)
        waited = time.monotonic() - t0
        box.put(b"after")  # dropped: nobody reads
        assert not await box.flush()
        await box.close()
        return box, waited

    box, waited = asyncio.run(main())
    assert "0.3 s" in box.failed and 0.25 <= waited < 1.0, (box.failed, waited)
    assert written == [b"a", b"b"] and box.pending == 0


def test_session_of_a_client_that_stops_reading_is_stalled(tiny):
    """The session's own work goes on (its sends return at once), and ``stalled`` tells the
    Gateway to close it and free its slot."""
    from serve_app.scheduler import LocalLM

    async def main():
        gate = asyncio.Event()

        async def never(m: bytes) -> None:
            await gate.wait()

        s = HalfDuplexSession(
            LocalLM(tiny, "stuck"), never, Pcm16Wire(), SessionSettings(send_timeout_s=0.3)
        )
        t0 = time.monotonic()
        await s.start({})
        for _ in range(20):
            await s.keepalive()
            await s.event(event="noise")
        assert time.monotonic() - t0 < 1.0  # nothing waited on the socket
        await _wait(lambda: s.stalled is not None, 5)
        stalled = s.stalled
        t1 = time.monotonic()
        await s.close()  # frees the model slot at once: nothing is left to flush
        return stalled, time.monotonic() - t1

    stalled, closing = asyncio.run(main())
    assert stalled and "not taken" in stalled and closing < 0.5
    assert "stuck" not in tiny.convs


def test_gateway_closes_a_session_whose_client_stopped_reading(tiny, serve_root):
    """The Gateway's ticker sees the stalled outbox and closes the session with 1008 (the
    receive loop then ends it and frees its slot), even though the socket never drains."""
    from serve_app.gateway import Gateway
    from serve_app.scheduler import LocalLM

    class StuckSocket:
        closed_with: tuple[int, str] | None = None

        async def close(self, code: int, reason: str) -> None:
            self.closed_with = (code, reason)
            await asyncio.Event().wait()  # the close frame does not drain either

    async def main():
        gate = asyncio.Event()

        async def never(m: bytes) -> None:
            await gate.wait()

        gw = object.__new__(Gateway.func_or_class)
        gw.cfg = C.local_serve_config(serve_root, extra=["serve.send_timeout_s=0.3"])
        s = HalfDuplexSession(
            LocalLM(tiny, "deaf"), never, Pcm16Wire(), SessionSettings(send_timeout_s=0.3)
        )
        await s.start({})
        ws = StuckSocket()
        t0 = time.monotonic()
        reason = await asyncio.wait_for(gw._tick(ws, s), 30)
        took = time.monotonic() - t0
        await s.close()
        return reason, ws.closed_with, took

    reason, closed_with, took = asyncio.run(main())
    assert reason == "not_reading" and closed_with[0] == 1008, (reason, closed_with)
    assert "not taken" in closed_with[1] and took < 3, took


def test_internal_errors_are_generic_to_clients(tiny, caplog):
    from serve_app.scheduler import LocalLM

    secret = "secret-internal-detail-42"

    class FailingLM(LocalLM):
        async def end_turn(self):
            raise RuntimeError(secret)

    class FailingWire(Pcm16Wire):
        def decode(self, payload: bytes, *admit) -> np.ndarray:
            if payload == b"\x00\x00boom":
                raise KeyError(secret)
            return super().decode(payload, *admit)

    async def main():
        out = Recorder()
        s = HalfDuplexSession(FailingLM(tiny, "errors"), out, FailingWire())
        await s.start({})
        await s.on_message(P.audio(b"\x00\x00boom"))  # an unexpected failure in the handler
        await s.on_message(P.control(P.Control.END_TURN))  # the model call fails
        for _ in range(100):
            if len(out.errors()) >= 2:
                break
            await asyncio.sleep(0.02)
        await s.on_message(b"\x09")  # and the session goes on
        await s.close()
        return out

    out = asyncio.run(main())
    errors = out.errors()
    assert len(errors) == 3, errors
    assert not any(secret in e for e in errors), errors
    assert "internal error" in errors[0] and "end_turn" in errors[1]
    assert secret in caplog.text  # the detail is logged for the operator


def test_check_health_sees_a_dead_engine_thread(serve_root):
    """Ray Serve calls ``check_health`` every 10 s and replaces a replica that raises."""
    from serve_app.model_source import resolve_model
    from serve_app.scheduler import build_scheduler
    from serve_app.speech_lm import SpeechLM

    cfg = C.local_serve_config(serve_root)
    sched, _ = build_scheduler(cfg, resolve_model(cfg).describe())
    lm = object.__new__(SpeechLM.func_or_class)
    lm.sched = sched
    lm.check_health()  # alive: no error
    sched.shutdown()
    assert not sched.thread.thread.is_alive()
    sched.shutdown()  # again (Serve's hook and garbage collection may both call it): a no-op
    with pytest.raises(RuntimeError, match="engine thread"):
        lm.check_health()


def test_close_gives_up_on_a_model_that_never_frees_the_conversation(tiny, caplog):
    """A ``close`` that never returns (a replica or router fault) must not hold the
    websocket's handler, and with it a slot of the Gateway, for ever."""
    from serve_app.scheduler import LocalLM

    class HungLM(LocalLM):
        async def close(self):
            await asyncio.Event().wait()

    async def main() -> float:
        settings = SessionSettings(close_timeout_s=0.3)
        s = HalfDuplexSession(HungLM(tiny, "hung-close"), Recorder(), Pcm16Wire(), settings)
        await s.start({})
        t0 = time.monotonic()
        await s.close()
        return time.monotonic() - t0

    took = run(main(), timeout=20)
    assert 0.3 <= took < 3.0, took
    assert "did not close the conversation" in caplog.text
    run(tiny.close("hung-close"))
