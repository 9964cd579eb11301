"""The ``SpeechLM`` deployment (the model and the codec on one device, many conversations
through the scheduler) and ``HandleLM``, the Gateway's client for one conversation on it."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from ray import serve
from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from serve_app import metrics
from serve_app.scheduler import Busy, build_scheduler
from voxtral.config import Config

log = logging.getLogger("ray.serve.voxtral")


@serve.deployment(name="SpeechLM")
class SpeechLM:
    """The model and the codec on one device, with many conversations (see scheduler)."""

    def __init__(self, cfg: dict, source: dict):
        self.sched, self.info = build_scheduler(Config.model_validate(cfg), source)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (direct construction in a script)
            self.replica = "local"
        log.info(
            "SpeechLM %s loaded %s (%s) on %s",
            self.replica,
            source["model"],
            source["model_source"],
            self.info["device"],
        )

    async def open(self, sid: str) -> dict[str, Any]:
        try:
            out = await self.sched.open(sid)
        except Busy as exc:
            return {"error": str(exc)}
        metrics.record("lm_sessions", len(self.sched.convs), replica=self.replica)
        return {**out, "replica": self.replica}

    async def feed(self, sid: str, pcm: np.ndarray) -> int:
        return await self.sched.feed(sid, pcm)

    async def end_turn(self, sid: str) -> int:
        return await self.sched.end_turn(sid)

    async def respond(self, sid: str) -> AsyncGenerator[dict[str, Any], None]:
        async for item in self.sched.respond(sid):
            yield item

    async def stream(self, sid: str) -> AsyncGenerator[dict[str, Any], None]:
        async for item in self.sched.stream(sid):
            yield item

    async def interrupt(self, sid: str, heard_s: float) -> dict[str, Any]:
        return await self.sched.interrupt(sid, heard_s)

    async def restart(self, sid: str) -> None:
        await self.sched.restart(sid)

    async def close(self, sid: str) -> None:
        await self.sched.close(sid)
        metrics.record("lm_sessions", len(self.sched.convs), replica=self.replica)

    def stats(self) -> dict[str, Any]:
        return {**self.sched.stats(), "replica": self.replica}

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose engine thread has died would hold
        conversations that never advance, so report it and let Serve replace it."""
        if not self.sched.alive():
            raise RuntimeError("the SpeechLM engine thread is not running")

    def __del__(self) -> None:
        """Ray Serve's shutdown hook (it calls ``__del__`` once when it stops a replica):
        stop the engine thread through the scheduler, which owns it."""
        sched = getattr(self, "sched", None)  # None: ``__init__`` failed before building it
        if sched is not None:
            sched.shutdown()


def call(
    handle: DeploymentHandle, method: str, *args: Any, stream: bool = False
) -> DeploymentResponse | DeploymentResponseGenerator:
    """``handle.<method>.remote(*args)`` as a call of its own to Serve's router.

    Serve (2.60) gives every handle call made while serving a request the internal id of
    that request, and its router indexes the calls waiting for a replica by that id. Two
    calls of one websocket waiting at once (an operation being cancelled and the ``close``
    after it) then leave one that no replica is ever assigned to, and its routing task
    spins on the router's event loop, which every SpeechLM call of the Gateway shares
    (seen: every session stalled for 150 s after a control flood). So each call gets a
    fresh internal id; the request id, which ties the logs of a session together, stays.
    """

    def issue() -> DeploymentResponse | DeploymentResponseGenerator:
        ctx = serve_context._get_serve_request_context()
        fresh = dataclasses.replace(ctx, _internal_request_id=str(uuid.uuid4()))
        serve_context._serve_request_context.set(fresh)
        h = handle.options(stream=True) if stream else handle
        return getattr(h, method).remote(*args)

    return contextvars.copy_context().run(issue)


class HandleLM:
    """``session.LMClient`` over a SpeechLM handle: one conversation's calls, by session id."""

    def __init__(self, handle: DeploymentHandle, sid: str):
        self.h, self.sid = handle, sid

    async def open(self) -> dict[str, Any]:
        out = await call(self.h, "open", self.sid)
        if "error" in out:
            await self.close()  # routing pinned the session at ``open``: unpin it
            raise Busy(out["error"])
        return out

    async def feed(self, pcm: np.ndarray) -> int:
        return await call(self.h, "feed", self.sid, pcm)

    async def end_turn(self) -> int:
        return await call(self.h, "end_turn", self.sid)

    def respond(self) -> AsyncGenerator[dict[str, Any], None]:
        return self._streamed("respond")

    def stream(self) -> AsyncGenerator[dict[str, Any], None]:
        return self._streamed("stream")

    async def _streamed(self, method: str) -> AsyncGenerator[dict[str, Any], None]:
        gen = call(self.h, method, self.sid, stream=True)
        try:
            async for item in gen:
                yield item
        finally:
            gen.cancel()

    async def interrupt(self, heard_s: float) -> dict[str, Any]:
        return await call(self.h, "interrupt", self.sid, heard_s)

    async def restart(self) -> None:
        await call(self.h, "restart", self.sid)

    async def close(self) -> None:
        await call(self.h, "close", self.sid)
