"""Session affinity for SpeechLM: every call of a conversation goes to the replica that holds
its KV cache.

A conversation's calls all come from the Gateway replica that holds its websocket, so the
pin table lives in that Gateway's router. ``open`` goes to the replica with the fewest
pinned conversations and pins it; later calls naming the session go there (waiting when it
is at ``max_ongoing_requests``, as for any request); ``close`` unpins. Calls without a
session (``stats``) balance like ``open``. If a pinned replica dies, its conversations'
calls go elsewhere and fail with "unknown session", which the Gateway reports to the client.
An ``open`` refused as busy is followed by a ``close`` from the Gateway's handle, so a
refused session leaves no pin behind; ``pinned_sessions()`` counts the pins of this process
(shown at ``/healthz``) so a leak is visible.
"""

from __future__ import annotations

import importlib
import weakref
from collections import Counter
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

_ROUTERS: weakref.WeakSet[SessionAffinityRouter] = weakref.WeakSet()


def pinned_sessions() -> int:
    """Sessions pinned by the routers living in this process (a Gateway replica)."""
    return sum(len(getattr(r, "_pins", {})) for r in list(_ROUTERS))


def _register(router: SessionAffinityRouter) -> None:
    """Add a router to the registry of the imported module. Serve ships the router class
    pickled by value, so its methods see a copy of this module's globals: the registry
    must be reached through ``sys.modules``, not through a global name."""
    importlib.import_module("serve_app.routing")._ROUTERS.add(router)


def session_of(args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """The session id of a SpeechLM call: its ``sid`` argument (first positional)."""
    sid = kwargs.get("sid", args[0] if args else None)
    return sid if isinstance(sid, str) else None


def pick(
    candidates: list[ReplicaID], pins: dict[str, ReplicaID], sid: str | None
) -> list[list[ReplicaID]]:
    """Ranked candidate replicas for a call (pure, so the policy is tested without Ray)."""
    if not candidates:
        return []
    if sid is not None and sid in pins and pins[sid] in candidates:
        return [[pins[sid]]]
    load = Counter(pins.values())
    least = min(load[r] for r in candidates)
    first = [r for r in candidates if load[r] == least]
    rest = [r for r in candidates if load[r] != least]
    return [first, rest] if rest else [first]


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._pins: dict[str, ReplicaID] = {}
        _register(self)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        sid = None
        if pending_request is not None:
            sid = session_of(pending_request.args, pending_request.kwargs)
            # Every rank returned here is final, so a call no replica can take now must
            # back off between tries. Serve's own policies set this flag; left unset, its
            # routing loop retries without ever yielding, starving every other call.
            pending_request.routing_context.should_backoff = True
        ranks = pick(list(by_id), getattr(self, "_pins", {}), sid)
        return [[by_id[r] for r in rank] for rank in ranks]

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        """Pin when the replica is chosen: Ray (2.60) calls ``on_request_routed`` only with
        strict ``max_ongoing_requests`` on, so that hook alone would never pin anything."""
        replica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        self._record(pending_request, replica.replica_id)
        return replica

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self._record(pending_request, replica_id)

    def _record(self, pending_request: PendingRequest, replica_id: ReplicaID) -> None:
        """``open`` pins its session to the replica, ``close`` unpins (idempotent)."""
        if not hasattr(self, "_pins"):
            self._pins = {}
            _register(self)
        sid = session_of(pending_request.args, pending_request.kwargs)
        method = pending_request.metadata.call_method
        if sid is None:
            return
        if method == "open":
            self._pins[sid] = replica_id
        elif method == "close":
            self._pins.pop(sid, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for sid in [s for s, r in getattr(self, "_pins", {}).items() if r == replica_id]:
            del self._pins[sid]
