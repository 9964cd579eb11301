"""Serve metrics in the Ray dashboard: sessions, how they end, first-audio latency.

``metrics.record(name, value, **tags)``; created lazily in the recording process and never
allowed to break a conversation (see :mod:`voxtral.metrics`).
"""

from __future__ import annotations

from voxtral.metrics import Metric, Metrics

LATENCY_BOUNDARIES_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000)

METRICS = Metrics(
    sessions=Metric("gauge", "voxtral_serve_sessions", "Open voice sessions on this Gateway."),
    sessions_total=Metric("counter", "voxtral_serve_sessions_total", "Voice sessions started."),
    ended=Metric(
        "counter",
        "voxtral_serve_sessions_ended_total",
        "Voice sessions ended, by reason.",
        ("reason",),
    ),
    first_audio=Metric(
        "histogram",
        "voxtral_serve_first_audio_ms",
        "End of user speech to the first audio message of the model's turn (ms).",
        boundaries=LATENCY_BOUNDARIES_MS,
    ),
    interrupts=Metric("counter", "voxtral_serve_interrupts_total", "Model turns cut by the user."),
    lm_sessions=Metric(
        "gauge",
        "voxtral_serve_lm_sessions",
        "Conversations held by a SpeechLM replica.",
        ("replica",),
    ),
)
record = METRICS.record
