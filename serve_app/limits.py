"""Per-session rate limits: what a client may send per second of wall time.

Both limits are token buckets: the message rate (``serve.max_messages_per_s``) and the audio
budget (``serve.max_audio_rate`` seconds of audio per second, bursts of
``serve.max_audio_ahead_s``), so a client may run a little ahead of real time (a network
hiccup, a client that buffers) but never far: decoding and VAD cost what real time costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class SessionOverload(RuntimeError):
    """The session broke a limit (queued model work, audio ahead of real time…); the gateway
    closes it with 1008. The message is ours (safe to send to the client)."""


class TokenBucket:
    """``rate`` units per second on average, bursts of ``burst``; it starts full."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.t = burst, clock()

    def take(self, amount: float = 1.0) -> bool:
        """Spend ``amount`` if the bucket holds it (False, and nothing spent, if not)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def allow(self) -> bool:
        """One message."""
        return self.take(1.0)


class AudioBudget:
    """Seconds of client audio a session may decode: ``rate`` × real time, with bursts of
    ``ahead_s``. Charged before the audio is decoded (see ``audio_io``), so a payload that
    claims more than the budget is refused before it costs anything."""

    def __init__(
        self, rate: float, ahead_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.ahead_s = rate, ahead_s
        self.bucket = TokenBucket(rate, ahead_s, clock)

    def admit(self, seconds: float) -> None:
        """Take ``seconds`` of audio, or raise ``SessionOverload``."""
        if seconds > 0 and not self.bucket.take(seconds):
            raise SessionOverload(
                f"audio more than {self.ahead_s:g} s ahead of real time "
                f"(at most {self.rate:g}× real time)"
            )
