"""yt-dlp in one place: the options every call shares, what its errors mean, and fetching
one video's audio with its Python API.

The index's search (``voxtral.stages.index.search_youtube``) and the scrape's download both start
from ``base_ydl_params`` and read errors here: ``classify`` names a failure (``http_404``,
``timeout``, …) and ``is_transient`` / ``is_rate_limited`` say whether waiting helps.
``resolve_path`` finds the folders a config names (the local corpus, the search terms).

Only ``http(s)`` URLs are fetched, plus ``file://`` URLs under the local corpus folder for
the local source (yt-dlp's ``enable_file_urls`` is switched on for that case only). Hosts
that resolve to loopback, private, link-local or otherwise reserved addresses are refused
for non-local rows (an index row must not make a worker fetch from the cluster's own
network), unless ``scrape.allow_private_hosts`` says so (the tests' loopback server). The
download stops as soon as it passes ``scrape.max_download_mb`` or the announced duration
passes ``index.max_duration_s``. The downloaded file is named from a fixed stem inside a
private temporary folder, never from a title, and no shell is involved anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from voxtral.config import REPO_ROOT, ScrapeConfig

MAX_CAPTION_BYTES = 8 << 20


class ScrapeFailure(Exception):
    """A video that cannot be scraped, with a short machine-readable ``reason``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Downloaded:
    path: str
    captions_vtt: str | None = None
    info: dict = field(default_factory=dict)


def resolve_path(path: str) -> Path:
    """A config path: absolute as given; relative to the working directory, else the repo."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def local_file(url: str, local_root: Path) -> Path:
    """The file a ``file://`` URL names, if it lies under ``local_root``; else a failure."""
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise ScrapeFailure("bad_url", f"local source needs a file:// URL, got {url!r}")
    path = Path(unquote(parsed.path)).resolve()
    root = local_root.resolve()
    if not path.is_relative_to(root):
        raise ScrapeFailure("bad_url", f"{path} is outside the local corpus folder {root}")
    if not path.is_file():
        raise ScrapeFailure("http_404", f"no such file: {path}")
    return path


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_host(host: str) -> None:
    """Refuse a host that is, or resolves to, a non-public address (loopback, private,
    link-local such as the cloud metadata service, reserved, multicast). A name that does
    not resolve passes: the download fails on it anyway, with the network's reason."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return
    private = sorted({i[4][0] for i in infos if not _public(str(i[4][0]))})
    if private:
        raise ScrapeFailure(
            "bad_url",
            f"{host!r} resolves to a non-public address ({', '.join(private)}); set "
            "scrape.allow_private_hosts=true only for an index you trust",
        )


def check_url(url: str, source: str, local_root: Path | None, allow_private: bool = False) -> None:
    """Refuse any URL the index should not contain, before anything is fetched."""
    if source == "local":
        if local_root is None:
            raise ScrapeFailure("bad_url", "local source without a local folder")
        local_file(url, local_root)
        return
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ScrapeFailure("bad_url", f"only http(s) URLs are fetched, got {url!r}")
    if not allow_private:
        check_host(parsed.hostname)


class _Quiet:
    """yt-dlp logger that keeps errors for the failure row and prints nothing."""

    def __init__(self):
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    info = warning = debug

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def _retry_sleep(n: int) -> float:
    return min(0.5 * 2**n, 30.0)


def base_ydl_params(timeout_s: float, proxy: str | None = None) -> dict:
    """The yt-dlp options every call shares: silent, no cache on disk, bounded waits."""
    params = {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "socket_timeout": timeout_s,
        "cachedir": False,
    }
    if proxy:
        params["proxy"] = proxy
    return params


def ydl_params(cfg: ScrapeConfig, outdir: str, allow_file: bool) -> dict:
    """Download options: best audio as served (no post-processing), bounded retries."""
    from yt_dlp.utils import parse_bytes

    params = base_ydl_params(cfg.timeout_s, cfg.proxy)
    params |= {
        "format": cfg.format,
        "outtmpl": {"default": os.path.join(outdir, "media.%(ext)s")},
        "paths": {"home": outdir, "temp": outdir},
        "restrictfilenames": True,
        "noplaylist": True,
        "logger": _Quiet(),
        "retries": cfg.retries,
        "fragment_retries": cfg.retries,
        "extractor_retries": cfg.retries,
        "file_access_retries": 0,
        "retry_sleep_functions": {k: _retry_sleep for k in ("http", "fragment", "extractor")},
        "enable_file_urls": allow_file,
        "overwrites": True,
        "continuedl": False,
        "postprocessors": [],
        "writesubtitles": False,
        "writeautomaticsub": False,
    }
    if cfg.rate_limit:
        params["ratelimit"] = parse_bytes(cfg.rate_limit)
    if cfg.cookies_file:
        params["cookiefile"] = cfg.cookies_file
    return params


def pick_caption_track(info: dict) -> dict | None:
    """The WebVTT automatic-caption track in the video's own language, if any.

    YouTube lists machine translations into every language too; the original-language
    track is the one marked ``-orig`` (else the one matching ``language``).
    """
    auto = info.get("automatic_captions") or {}
    manual = info.get("subtitles") or {}
    lang = info.get("language")
    candidates = [k for k in auto if k.endswith("-orig")]
    if lang:
        candidates += [k for k in (f"{lang}-orig", lang) if k in auto]
    for key in candidates:
        for track in auto[key]:
            if track.get("ext") == "vtt" and track.get("url"):
                return track
    if lang and lang in manual:
        for track in manual[lang]:
            if track.get("ext") == "vtt" and track.get("url"):
                return track
    return None


class _SizeCap:
    """yt-dlp progress hook that stops a download once it announces or reaches more than
    ``limit`` bytes (a missing Content-Length does not get past it)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, d: dict) -> None:
        size = max(d.get("downloaded_bytes") or 0, d.get("total_bytes") or 0)
        if size > self.limit:
            raise ScrapeFailure(
                "too_large",
                f"the download is over scrape.max_download_mb ({size} > {self.limit} bytes)",
            )


def check_duration(seconds: float | None, max_duration_s: float | None) -> None:
    """``too_long`` for audio announced or decoded past ``index.max_duration_s``."""
    if seconds and max_duration_s and seconds > max_duration_s:
        raise ScrapeFailure(
            "too_long", f"{seconds:.0f} s is over index.max_duration_s={max_duration_s:.0f}"
        )


def download(
    url: str,
    outdir: str,
    cfg: ScrapeConfig,
    allow_file: bool = False,
    max_duration_s: float | None = None,
) -> Downloaded:
    """Download the best audio stream of ``url`` into ``outdir`` (no re-encoding), within
    ``scrape.max_download_mb`` and, when the site says how long it is, ``max_duration_s``."""
    from yt_dlp import YoutubeDL

    params = ydl_params(cfg, outdir, allow_file)
    params["progress_hooks"] = [_SizeCap(cfg.max_download_mb << 20)]
    with YoutubeDL(params) as ydl:
        # Extract first, download second: a video announced as too long costs no bytes.
        info = ydl.extract_info(url, download=False)
        if info and info.get("_type", "video") == "video":
            check_duration(info.get("duration"), max_duration_s)
            info = ydl.process_ie_result(info, download=True)
        if not info or info.get("_type") == "playlist" or not info.get("requested_downloads"):
            raise ScrapeFailure("not_a_video", f"{url} is not a single video")
        path = info["requested_downloads"][0].get("filepath")
        if not path or not os.path.isfile(path):
            raise ScrapeFailure("empty", "yt-dlp reported success but wrote no file")
        vtt = None
        track = pick_caption_track(info)
        if track is not None:
            try:
                with ydl.urlopen(track["url"]) as resp:
                    vtt = resp.read(MAX_CAPTION_BYTES).decode("utf-8", "replace")
            except Exception:  # captions are a bonus: their failure is not the video's
                vtt = None
    keep = ("id", "title", "duration", "language", "ext", "acodec", "abr", "asr")
    return Downloaded(path=path, captions_vtt=vtt, info={k: info.get(k) for k in keep})


# -- what an error means --------------------------------------------------------------------

_RATE_LIMITED = re.compile(r"\b429\b|too many requests|slow down|rate.?limit|quota", re.I)
_TRANSIENT = re.compile(
    r"timed? ?out|\b5\d\d\b|temporarily|connection (reset|aborted|refused)|remote end closed",
    re.I,
)
_HTTP = re.compile(r"HTTP Error (\d{3})")
_RULES = [
    (re.compile(r"timed? ?out|Read timed out|TimeoutError", re.I), "timeout"),
    (
        re.compile(r"bytes read, \d+ more expected|too short|IncompleteRead|incomplete", re.I),
        "truncated",
    ),
    (re.compile(r"Did not get any data blocks|downloaded file is empty", re.I), "empty"),
    (re.compile(r"Unsupported URL", re.I), "unsupported_url"),
    (re.compile(r"Requested format is not available|No video formats", re.I), "no_audio_format"),
    (
        re.compile(r"Private video|Video unavailable|members-only|removed|Sign in", re.I),
        "unavailable",
    ),
    (
        re.compile(r"Connection refused|Name or service not known|getaddrinfo|resolve", re.I),
        "network",
    ),
]


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every exception it wraps (yt-dlp nests them several ways)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        info = getattr(e, "exc_info", None)
        if isinstance(info, tuple) and len(info) > 1 and isinstance(info[1], BaseException):
            todo.append(info[1])
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def classify(exc: BaseException) -> str:
    """A short reason for a download error: ``http_404``, ``timeout``, ``truncated``, …"""
    chain = _chain(exc)
    for e in chain:  # our own reason, raised inside yt-dlp (a progress hook) and wrapped
        if isinstance(e, ScrapeFailure):
            return e.reason
    for e in chain:
        status = getattr(e, "status", None) or getattr(e, "code", None)
        if type(e).__name__ == "HTTPError" and isinstance(status, int):
            return f"http_{status}"
    for e in chain:
        if isinstance(e, socket.timeout | TimeoutError):
            return "timeout"
        if type(e).__name__ in ("ContentTooShortError", "IncompleteRead"):
            return "truncated"
    text = " | ".join(str(e) for e in chain)
    m = _HTTP.search(text)
    if m:
        return f"http_{m.group(1)}"
    for pattern, reason in _RULES:
        if pattern.search(text):
            return reason
    return "download_error" if type(exc).__name__ == "DownloadError" else "error"


def is_rate_limited(exc: BaseException) -> bool:
    """The site asked us to slow down (HTTP 429, "too many requests", a quota)."""
    return bool(_RATE_LIMITED.search(str(exc)))


def is_transient(exc: BaseException) -> bool:
    """Errors worth waiting out: "slow down" answers, timeouts, server errors."""
    return (
        is_rate_limited(exc) or isinstance(exc, TimeoutError) or bool(_TRANSIENT.search(str(exc)))
    )
