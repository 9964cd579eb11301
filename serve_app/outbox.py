"""Messages to one client, written in order by one task, so that a client that stops reading
stalls nothing but its own outbox.

Sending on a websocket waits while the socket's buffers are full. Awaited in line, one
client that never reads would hold up its session's keep-alive, its idle and time limits
and its model turn, and with them its slot, for as long as the connection stays up. Here a
session only queues; the writer gives each message ``timeout_s`` to go out, and a message
that has waited longer than that in the queue (or a send that fails) marks the outbox
``failed``: the gateway then closes the session and frees its slot.

(Behind Ray Serve's HTTP proxy the Gateway's sends return at once, the proxy holds what the
client has not taken, and the proxy's own websocket keep-alive drops a client that answers
no ping for 40 s; where the Gateway's sends do block, e.g. with Serve's direct ingress, this
is what frees the slot.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger("ray.serve.voxtral")


class Outbox:
    """A per-session outgoing queue, bounded in time: ``put`` never waits."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._send, self.timeout_s, self.clock = send, timeout_s, clock
        self._queue: deque[tuple[float, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self.failed: str | None = None  # why the client can no longer be written to

    def put(self, message: bytes) -> None:
        """Queue ``message`` (dropped once the outbox has failed)."""
        if self.failed is not None:
            return
        now = self.clock()
        if self._queue and now - self._queue[0][0] > self.timeout_s:
            self._fail(f"the client has not taken our messages for {self.timeout_s:g} s")
            return
        self._queue.append((now, message))
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._write())

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is written (or the outbox failed, or ``timeout_s``
        passed: default the send timeout); True if it all went out."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s or self.timeout_s)
        except TimeoutError:
            return False
        return self.failed is None

    async def close(self) -> None:
        """Stop the writer; what is still queued is dropped."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._queue.clear()
        self._idle.set()

    def _fail(self, why: str) -> None:
        if self.failed is None:
            log.info("outbox failed: %s", why)
            self.failed = why
        self._queue.clear()
        self._idle.set()

    async def _write(self) -> None:
        while self.failed is None:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            queued_at, message = self._queue[0]
            left = self.timeout_s - (self.clock() - queued_at)
            try:
                await asyncio.wait_for(self._send(message), max(left, 0.0))
            except TimeoutError:
                self._fail(f"the client has not taken our messages for {self.timeout_s:g} s")
            except Exception as exc:  # the socket is closed or broken: nobody to write to
                self._fail(f"cannot write to the client ({type(exc).__name__})")
            else:
                self._queue.popleft()
