"""The ``Gateway`` deployment: HTTP (page, static files, ``/healthz``) and the websocket
``/api/chat``, where each connection is checked (:func:`refusal`), gets a
session on a SpeechLM replica (:class:`~serve_app.half_duplex.HalfDuplexSession` or
:class:`~serve_app.full_duplex.FullDuplexSession`, as the model), and is held to the limits
of ``serve.*`` (README, "Limits and security").

(No ``from __future__ import annotations`` here: Serve's ingress rewrites the methods, and
FastAPI must see the real ``WebSocket`` annotation to hand the socket over instead of
refusing the connection as a bad request.)
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import metrics
from serve_app import protocol as P
from serve_app.audio_io import WIRE_FORMATS, make_wire_audio
from serve_app.full_duplex import FullDuplexSession
from serve_app.half_duplex import HalfDuplexSession
from serve_app.limits import SessionOverload, TokenBucket
from serve_app.routing import pinned_sessions
from serve_app.scheduler import Busy
from serve_app.session import Session, SessionSettings
from serve_app.speech_lm import HandleLM, call
from voxtral.config import Config, ServeConfig, is_loopback

log = logging.getLogger("ray.serve.voxtral")
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {p.name for p in STATIC.glob("*") if p.is_file()}
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_TRY_LATER = 1008, 1009, 1011, 1013

api = FastAPI(title="Voxtral", docs_url=None, redoc_url=None)


def token_of(ws: WebSocket) -> str | None:
    """``?token=`` or ``Authorization: Bearer …``."""
    if "token" in ws.query_params:
        return ws.query_params["token"]
    auth = ws.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _hostname(host_header: str) -> str:
    """``Host`` header → host name (``[::1]:8000`` → ``::1``)."""
    return urlsplit("//" + host_header).hostname or ""


def refusal(
    headers: Mapping[str, str],
    given_token: str | None,
    client_host: str | None,
    s: ServeConfig,
    wire_format: str = "opus",
) -> str | None:
    """Why this connection may not start (None: it may). Checked before any model work.

    - Token: when ``serve.token`` is set it must match. Without one (loopback profile),
      only loopback clients that named a loopback host may connect, unless
      ``serve.allow_anonymous`` (so DNS rebinding cannot reach a tokenless local server).
    - Origin: a browser always sends one; it must be the page's own origin (same host) or
      listed in ``serve.allowed_origins`` (``"*"``: any). No Origin means a non-browser
      client (Moshi's CLI, scripts): accepted when it authenticated with the token, or from
      loopback; a remote tokenless client without an Origin is refused.
    """
    authenticated = False
    if s.requires_token:
        if not s.token_matches(given_token):
            return "missing or wrong token"
        authenticated = True
    elif not s.allow_anonymous and not (
        is_loopback(client_host) and is_loopback(_hostname(headers.get("host", "")))
    ):
        return "this server has no token and takes local (loopback) clients only"
    origin = headers.get("origin")
    if origin is None:
        if not authenticated and not is_loopback(client_host):
            return "a client without an Origin header must authenticate with the token"
    elif not (
        "*" in s.allowed_origins
        or origin in s.allowed_origins
        or urlsplit(origin).netloc.lower() == headers.get("host", "").lower()
    ):
        return f"origin {origin} is not allowed"
    if wire_format not in WIRE_FORMATS:  # the protocol calls it ``?codec=``
        return f"unknown codec {wire_format!r} (expected {', '.join(WIRE_FORMATS)})"
    return None


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, cfg: dict, lm: DeploymentHandle, source: dict):
        self.cfg = Config.model_validate(cfg)
        self.lm = lm
        self.source = source
        s = self.cfg.serve
        self.settings = SessionSettings(
            end_of_turn_ms=s.end_of_turn_ms,
            interrupt_ms=s.interrupt_ms,
            turn_end_silence_ms=s.turn_end_silence_ms,
            vad_threshold=s.vad_threshold,
            preroll_ms=s.preroll_ms,
            max_pending_ops=s.max_pending_ops,
            max_audio_rate=s.max_audio_rate,
            max_audio_ahead_s=s.max_audio_ahead_s,
            send_timeout_s=s.send_timeout_s,
        )
        # Ogg, Opus and VAD work of every session, off the event loop (see session.py)
        self.audio_pool = ThreadPoolExecutor(s.audio_threads, thread_name_prefix="voxtral-audio")
        self.sessions: dict[str, Session] = {}
        self.per_client: Counter[str] = Counter()  # open websockets per client address
        self.started = time.time()

    @api.get("/")
    async def index(self) -> FileResponse:
        """The browser client. Its paths are relative, so under a route prefix it is
        ``/prefix/`` (Starlette redirects ``/prefix`` there) with ``/prefix/static/…``."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @api.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        lm = await call(self.lm, "stats")
        return {
            "ok": True,
            **self.source,
            "gateway_sessions": len(self.sessions),
            "pinned_sessions": pinned_sessions(),
            "lm": lm,
            "uptime_s": round(time.time() - self.started, 1),
        }

    @api.websocket("/api/chat")
    async def chat(self, ws: WebSocket) -> None:
        s = self.cfg.serve
        client = ws.client.host if ws.client else ""
        wire_format = ws.query_params.get("codec", "opus")
        why = refusal(ws.headers, token_of(ws), client, s, wire_format)
        if why is not None:
            log.info("refused a connection from %s: %s", client, why)
            await ws.close(code=CLOSE_POLICY, reason=why)
            return
        self.per_client[client] += 1  # counted before any await: no race past the limit
        try:
            await ws.accept()
            if self.per_client[client] > s.max_sessions_per_client:
                why = f"too many sessions from your address (at most {s.max_sessions_per_client})"
                log.info("refused a connection from %s: %s", client, why)
                with contextlib.suppress(Exception):
                    await ws.send_bytes(P.error(why))
                    await ws.close(code=CLOSE_POLICY, reason="too many sessions")
                return
            await self._session(ws, wire_format)
        finally:
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

    async def _session(self, ws: WebSocket, wire_format: str) -> None:
        sid = uuid.uuid4().hex
        session: Session | None = None
        try:
            info = await call(self.lm, "describe")
            session = self._new_session(sid, info.get("mode"), ws, wire_format)
            await session.start({k: info[k] for k in ("model", "model_source", "device")})
        except Busy as exc:
            await ws.send_bytes(P.error(f"server busy: {exc}"))
            await ws.close(code=CLOSE_TRY_LATER, reason="server busy")
            return
        except Exception:  # the model deployment is down or failing (detail: the log)
            log.exception("session %s could not start", sid)
            await ws.send_bytes(P.error("cannot start a session now; try again later"))
            await ws.close(code=CLOSE_INTERNAL, reason="model unavailable")
            if session is not None:
                await session.close()
            return
        self.sessions[sid] = session
        metrics.record("sessions_total")
        metrics.record("sessions", len(self.sessions))
        reason = "disconnect"
        ticker = asyncio.create_task(self._tick(ws, session))
        try:
            reason = await self._receive(ws, session, ticker)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await session.close()
            self.sessions.pop(sid, None)
            metrics.record("sessions", len(self.sessions))
            metrics.record("ended", reason=reason)
            log.info("session %s ended: %s", sid, reason)

    def _new_session(self, sid: str, mode: str | None, ws: WebSocket, wire_format: str) -> Session:
        """The model's mode decides: full duplex for a 2-stream model, else turns."""
        kind = FullDuplexSession if mode == "full_duplex" else HalfDuplexSession
        return kind(
            HandleLM(self.lm, sid),
            ws.send_bytes,
            make_wire_audio(wire_format),
            self.settings,
            on_first_audio=lambda ms: metrics.record("first_audio", ms),
            on_interrupt=lambda: metrics.record("interrupts"),
            audio_pool=self.audio_pool,
        )

    async def _receive(self, ws: WebSocket, session: Session, ticker: asyncio.Task) -> str:
        s = self.cfg.serve
        limit = s.max_message_bytes
        rate = TokenBucket(s.max_messages_per_s, 2 * s.max_messages_per_s)
        receive = asyncio.ensure_future(ws.receive())
        try:
            while True:
                done, _ = await asyncio.wait({receive, ticker}, return_when=asyncio.FIRST_COMPLETED)
                if ticker in done:  # the ticker closed the session (idle, time limit)
                    return ticker.result()
                msg = receive.result()
                if msg["type"] == "websocket.disconnect":
                    return "disconnect"
                data = msg.get("bytes")
                if data is None:
                    data = msg.get("text") or ""
                if len(data) > limit:
                    with contextlib.suppress(Exception):
                        await ws.close(code=CLOSE_TOO_BIG, reason=f"message over {limit} bytes")
                    return "too_big"
                if not rate.allow():
                    why = f"more than {s.max_messages_per_s:g} messages per second"
                    await self._close_policy(ws, session, why)
                    return "rate_limit"
                try:
                    await session.on_message(data)
                except SessionOverload as exc:
                    await self._close_policy(ws, session, str(exc))
                    return "overload"
                receive = asyncio.ensure_future(ws.receive())
        finally:
            receive.cancel()

    async def _close_policy(self, ws: WebSocket, session: Session, why: str) -> None:
        """A 0x05 saying why, then close 1008 (the client broke a limit)."""
        log.info("closing a session: %s", why)
        with contextlib.suppress(Exception):
            await session.send(P.error(f"closing: {why}"))
            await session.flush()
            await asyncio.wait_for(
                ws.close(code=CLOSE_POLICY, reason=why[:120]), self.cfg.serve.send_timeout_s
            )

    async def _tick(self, ws: WebSocket, session: Session) -> str:
        """Keep-alive pings while listening; idle and session-length limits; a client that
        stopped reading (its session's outbox failed)."""
        s = self.cfg.serve
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            code = 1000
            if session.lost:
                why, reason, code = "the model replica lost this conversation", "lost", 1011
            elif session.stalled:  # the client stopped reading: nothing more will reach it
                why, reason, code = session.stalled, "not_reading", CLOSE_POLICY
            elif now - session.last_active > s.idle_timeout_s:
                why, reason = f"idle for {s.idle_timeout_s:g} s", "idle"
            elif now - t0 > s.max_session_s:
                why, reason = f"session time limit ({s.max_session_s:g} s)", "time_limit"
            else:
                await session.keepalive()
                continue
            with contextlib.suppress(Exception):
                await session.send(P.error(f"closing: {why}"))
                await session.flush()
                await asyncio.wait_for(ws.close(code=code, reason=why[:120]), s.send_timeout_s)
            return reason
