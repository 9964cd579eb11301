"""Session affinity for SpeechLM: every call of a conversation goes to the replica that holds
its KV cache.

A conversation's calls all come from the Gateway replica that holds its websocket, so the
pin table lives in that Gateway's router. ``open`` goes to the replica with the fewest
pinned conversations and pins it; later calls naming the session go there (waiting when it
is at ``max_ongoing_requests``, as for any request); ``close`` unpins. Calls without a
session (``stats``) balance like ``open``. If a pinned replica dies, its conversations'
calls go elsewhere and fail with "unknown session", which the Gateway reports to the client.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


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

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        sid = None
        if pending_request is not None:
            sid = session_of(pending_request.args, pending_request.kwargs)
        ranks = pick(list(by_id), getattr(self, "_pins", {}), sid)
        return [[by_id[r] for r in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        if not hasattr(self, "_pins"):
            self._pins = {}
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
