"""The ``serve`` section: the voice endpoint's address, its token, and every per-session
limit (with why each bound is what it is); plus the loopback and token-digest helpers the
exposure check and the Gateway share.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from pydantic import Field, field_validator

from voxtral.config.base import ConfigError, Section

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
"""Names and addresses that reach only this machine (127.0.0.0/8 is checked separately)."""


def token_digest(token: str, salt: str | None = None) -> str:
    """``<salt>:<sha256(salt + token)>`` (a fresh random salt unless given): what
    ``serve.token_sha256`` holds. The token is a long random secret, so one salted hash
    is enough; the salt keeps equal tokens from showing as equal digests."""
    salt = secrets.token_hex(16) if salt is None else salt
    return f"{salt}:{hashlib.sha256((salt + token).encode()).hexdigest()}"


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text.lower())


def is_loopback(host: str | None) -> bool:
    """True for a loopback address or name (``127.x.y.z``, ``::1``, ``localhost``)."""
    if not host:
        return False
    host = host.strip().lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.") or host == "::ffff:127.0.0.1"


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    token: str | None = None
    """Shared secret clients pass as ``?token=`` or ``Authorization: Bearer``; None = no
    token, which is allowed only on a loopback host (or with ``allow_anonymous``)."""
    token_sha256: str | None = None
    """``<salt>:<hex>``, the SHA-256 of salt + token: what the gateway checks when it does not
    hold the token itself. :meth:`Config.for_cluster` puts it in place of the token (no
    config that reaches Ray holds the token); set it directly so no file holds the token."""
    allow_anonymous: bool = False
    """Serve without a token on a non-loopback host (anyone who reaches the port may talk
    to the model). Off: such a start fails, and tokenless servers take loopback clients only."""
    model: str | None = None
    """Exported model folder; unset = newest export under storage.root, else the tiny model."""
    num_gpus: float = Field(0.0, ge=0)
    num_replicas: int = Field(1, ge=1)
    max_sessions: int = Field(16, ge=1)
    end_of_turn_ms: int = Field(600, ge=50)
    max_turn_s: float = Field(10.0, gt=0)
    turn_end_silence_ms: float = Field(1000.0, ge=100.0, le=60000.0)
    """Half duplex: the model's turn ends when its output, after speech, is quiet this long
    (output audio time); longer than the pauses between sentences, so answers are not cut."""
    max_message_bytes: int = Field(1 << 20, ge=1024)
    max_session_s: float = Field(1800.0, gt=0)
    idle_timeout_s: float = Field(60.0, gt=0)
    allowed_origins: list[str] = Field(default_factory=list)
    """Browser origins (``https://voice.example.com``) allowed besides the page's own
    (same-origin is always allowed); ``"*"`` allows every origin."""
    max_sessions_per_client: int = Field(4, ge=1)
    """Open sessions per client address on one Gateway replica (behind a reverse proxy
    every client shares the proxy's address: raise it or limit per client there)."""
    max_messages_per_s: float = Field(100.0, gt=0)
    """Messages a session may send per second on average (bursts up to two seconds' worth);
    past it the session is closed with 1008. Clients send 25–50 audio messages a second."""
    max_pending_ops: int = Field(32, ge=4)
    """Model operations one session may have queued (after coalescing) before it is closed
    with 1008."""
    max_audio_rate: float = Field(1.5, ge=1.0, le=100.0)
    """Seconds of audio a session may send per second of wall time, on average (1 is real
    time; above it a client that fell behind can catch up). Audio is counted before it is
    decoded (Opus: from each packet's header), so a decompression bomb costs nothing."""
    max_audio_ahead_s: float = Field(10.0, ge=1.0, le=600.0)
    """How far a session's audio may run ahead of real time (the burst, and so the most
    audio one message may carry); past it: 0x05 and close 1008."""
    preroll_ms: float = Field(400.0, ge=0.0, le=5000.0)
    """Audio kept from before the user's detected onset (and while the model speaks, for
    barge-in): it starts the user's turn. Bounded whatever the size of the messages."""
    send_timeout_s: float = Field(10.0, gt=0.0, le=300.0)
    """A message to the client not written within this long (the client stopped reading)
    closes the session with 1008 and frees its slot."""
    audio_threads: int = Field(2, ge=1, le=64)
    """Threads per Gateway replica for the sessions' audio decoding and VAD (each session
    has at most one message in work at a time, so one client cannot take them all)."""
    text_temperature: float = Field(0.7, ge=0)
    text_top_k: int = Field(50, ge=0)
    text_top_p: float = Field(0.95, gt=0, le=1)
    audio_temperature: float = Field(0.8, ge=0)
    audio_top_k: int = Field(250, ge=0)
    audio_top_p: float = Field(1.0, gt=0, le=1)
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per SpeechLM replica (on CPU also its torch threads)."""
    gateway_replicas: int = Field(1, ge=1)
    gateway_num_cpus: float = Field(0.5, ge=0)
    """CPUs per Gateway replica (Opus, VAD and websocket work of its sessions)."""
    chunk_ms: float = Field(80.0, gt=0)
    """Model audio per websocket message (rounded to whole groups)."""
    lead_ms: float = Field(300.0, ge=0)
    """How far generation may run ahead of real time: bounds the audio in flight, and so
    what an interrupt throws away."""
    max_lag_ms: float = Field(1000.0, ge=40.0, le=10_000.0)
    """Full duplex: user audio waiting for the model longer than this (the model fell behind
    real time) is dropped and reported, so a slow replica never queues without bound."""
    interrupt_ms: float = Field(200.0, ge=0)
    """User speech this long over the model's turn interrupts it."""
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    max_context_tokens: int = Field(4096, ge=64)
    """Oldest whole groups are dropped (and the rest prefilled again) past this."""
    seed: int | None = None
    """Sampling seed (reproducible conversations in tests); None = random."""

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                "must not be empty (an empty token would accept an empty password); "
                "unset it (null) for no token, or set a long random secret"
            )
        if v is not None and v != v.strip():
            raise ValueError("must not start or end with whitespace")
        return v

    @field_validator("token_sha256")
    @classmethod
    def _digest_form(cls, v: str | None) -> str | None:
        salt, _, digest = (v or "").partition(":")
        if v is not None and not (salt and len(digest) == 64 and _is_hex(digest)):
            raise ValueError("must be <salt>:<64 hex digits> (see voxtral.config.token_digest)")
        return v

    @property
    def requires_token(self) -> bool:
        return self.token is not None or self.token_sha256 is not None

    def token_matches(self, given: str | None) -> bool:
        """Whether ``given`` is the token (in constant time, against the token or its digest)."""
        if given is None or not self.requires_token:
            return False
        if self.token is not None:
            return hmac.compare_digest(given.encode(), self.token.encode())
        salt, _, digest = self.token_sha256.partition(":")  # type: ignore[union-attr]
        return hmac.compare_digest(token_digest(given, salt).partition(":")[2], digest)

    def check_exposure(self, host: str | None = None) -> None:
        """Refuse to listen on a non-loopback ``host`` (default ``serve.host``) without a
        token unless ``allow_anonymous`` says so: closed by default."""
        host = self.host if host is None else host
        if not self.requires_token and not self.allow_anonymous and not is_loopback(host):
            raise ConfigError(
                f"serve.host={host} is reachable from other machines but serve.token is not "
                "set: set serve.token (e.g. VOXTRAL_SERVE__TOKEN=$(openssl rand -hex 24)), "
                "or listen on 127.0.0.1, or set serve.allow_anonymous=true to serve anyone"
            )
