"""The ``SpeechLM`` deployment (the model and the codec on one device, many conversations
through the scheduler) and ``HandleLM``, the Gateway's client for one conversation on it."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

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


class HandleLM:
    """``session.LMClient`` over a SpeechLM handle: one conversation's calls, by session id."""

    def __init__(self, handle: DeploymentHandle, sid: str):
        self.h, self.sid = handle, sid

    async def open(self) -> dict[str, Any]:
        out = await self.h.open.remote(self.sid)
        if "error" in out:
            await self.close()  # routing pinned the session at ``open``: unpin it
            raise Busy(out["error"])
        return out

    async def feed(self, pcm: np.ndarray) -> int:
        return await self.h.feed.remote(self.sid, pcm)

    async def end_turn(self) -> int:
        return await self.h.end_turn.remote(self.sid)

    def respond(self) -> AsyncGenerator[dict[str, Any], None]:
        return self._streamed("respond")

    def stream(self) -> AsyncGenerator[dict[str, Any], None]:
        return self._streamed("stream")

    async def _streamed(self, method: str) -> AsyncGenerator[dict[str, Any], None]:
        gen = getattr(self.h.options(stream=True), method).remote(self.sid)
        try:
            async for item in gen:
                yield item
        finally:
            gen.cancel()

    async def interrupt(self, heard_s: float) -> dict[str, Any]:
        return await self.h.interrupt.remote(self.sid, heard_s)

    async def restart(self) -> None:
        await self.h.restart.remote(self.sid)

    async def close(self) -> None:
        await self.h.close.remote(self.sid)
