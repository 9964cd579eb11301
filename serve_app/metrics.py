"""Serve metrics in the Ray dashboard (``ray.util.metrics``): sessions and first-audio latency.

Created lazily inside the process that records them (metrics objects belong to a worker),
and never allowed to break a conversation.
"""

from __future__ import annotations

import logging
from functools import lru_cache

log = logging.getLogger("ray.serve.voxtral")

LATENCY_BOUNDARIES_MS = [50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000]


@lru_cache(maxsize=1)
def _metrics():
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "sessions": Gauge("voxtral_serve_sessions", "Open voice sessions on this Gateway."),
        "sessions_total": Counter("voxtral_serve_sessions_total", "Voice sessions started."),
        "ended": Counter(
            "voxtral_serve_sessions_ended_total",
            "Voice sessions ended, by reason.",
            tag_keys=("reason",),
        ),
        "first_audio": Histogram(
            "voxtral_serve_first_audio_ms",
            "End of user speech to the first audio message of the model's turn (ms).",
            boundaries=LATENCY_BOUNDARIES_MS,
        ),
        "interrupts": Counter("voxtral_serve_interrupts_total", "Model turns cut by the user."),
        "lm_sessions": Gauge(
            "voxtral_serve_lm_sessions",
            "Conversations held by a SpeechLM replica.",
            tag_keys=("replica",),
        ),
    }


def record(name: str, value: float = 1.0, **tags: str) -> None:
    try:
        m = _metrics()[name]
        kind = type(m).__name__
        if kind == "Counter":
            m.inc(value, tags=tags or None)
        elif kind == "Gauge":
            m.set(value, tags=tags or None)
        else:
            m.observe(value, tags=tags or None)
    except Exception:  # metrics are best effort (e.g. outside a Ray worker)
        log.debug("metric %s not recorded", name, exc_info=True)
