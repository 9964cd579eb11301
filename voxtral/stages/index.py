"""Stage 1, index: search terms (or a local folder) → ``index/<batch>.parquet`` rows.

The YouTube source runs one Ray Data task per search term (``ytsearchN:`` through
yt-dlp's flat extraction, no other search package), with bounded concurrency and
exponential backoff when the search answers "slow down". Entries are filtered (duration
bounds, no live or upcoming streams, no shorts, videos only) and de-duplicated by
``video_id`` across terms and against earlier runs, so a rerun adds only new ids.

The local source indexes audio files under ``index.local_dir`` as ``file://`` URLs, so the
whole pipeline runs offline (tests, the demo).
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import ray

from voxtral import failures, schema
from voxtral.config import Config, IndexConfig
from voxtral.download import base_ydl_params, is_rate_limited, is_transient, resolve_path
from voxtral.metrics import Metric, Metrics
from voxtral.stages import report
from voxtral.storage import Storage

STAGE = "index"
SEARCH_NUM_CPUS = 0.1
"""A search is a network call: reserve a sliver of a core so many can wait at once."""
AUDIO_EXTENSIONS = frozenset(
    ".wav .mp3 .ogg .oga .opus .m4a .aac .flac .webm .mka .mkv .mp4 .wma .aiff .aif".split()
)
DROP_LIVE_STATUS = frozenset({"is_live", "is_upcoming", "post_live"})
_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{6,64}")

SearchFn = Callable[..., list[dict]]
"""``search(term, n, proxy=...)`` → yt-dlp flat entries (injectable for tests)."""


def read_terms(path: str | Path, max_terms: int | None = None) -> list[str]:
    """Search terms, one a line; blank lines and ``#`` comments skipped, duplicates dropped."""
    terms: list[str] = []
    seen: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        term = " ".join(line.split())
        if not term or term.startswith("#") or term.casefold() in seen:
            continue
        seen.add(term.casefold())
        terms.append(term)
    return terms[:max_terms] if max_terms else terms


def term_item_id(term: str) -> str:
    """A stable failure id for a term (terms in any script map to distinct file names)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", term).strip("-")[:40] or "term"
    return f"{slug}-{hashlib.sha1(term.encode()).hexdigest()[:10]}"


# -- pure filtering of yt-dlp's flat search entries --------------------------------------------


def entry_to_row(entry: dict, term: str, cfg: IndexConfig) -> dict | None:
    """One flat search entry → an index row, or None when it is not a video we want."""
    if not isinstance(entry, dict):
        return None
    vid = entry.get("id")
    url = str(entry.get("url") or "")
    if not isinstance(vid, str) or not _VIDEO_ID.fullmatch(vid):
        return None
    if entry.get("ie_key") not in (None, "Youtube") or entry.get("_type") not in (None, "url"):
        return None  # channels, playlists, podcasts shelves
    if "/shorts/" in url or "/playlist" in url or "/channel/" in url:
        return None
    if entry.get("live_status") in DROP_LIVE_STATUS or entry.get("is_live"):
        return None
    duration = entry.get("duration")
    if not isinstance(duration, int | float) or duration <= 0:
        return None  # live streams and upcoming premieres come without a duration
    if not cfg.min_duration_s <= duration <= cfg.max_duration_s:
        return None
    return {
        "video_id": vid,
        "url": f"https://www.youtube.com/watch?v={vid}",
        "title": str(entry.get("title") or ""),
        "channel": str(entry.get("channel") or entry.get("uploader") or ""),
        "duration_s": float(duration),
        "search_term": term,
        "source": "youtube",
    }


def filter_entries(entries: Iterable[dict], term: str, cfg: IndexConfig) -> list[dict]:
    """The wanted rows among one term's entries, in search order, each id once."""
    rows, seen = [], set()
    for e in entries or ():
        row = entry_to_row(e, term, cfg)
        if row is not None and row["video_id"] not in seen:
            seen.add(row["video_id"])
            rows.append(row)
    return rows


def dedupe(rows: Iterable[dict], seen: set[str]) -> list[dict]:
    """Rows whose ``video_id`` is not in ``seen`` (first one wins); ``seen`` is updated."""
    out = []
    for r in rows:
        if r["video_id"] not in seen:
            seen.add(r["video_id"])
            out.append(r)
    return out


# -- the search call ----------------------------------------------------------------------------


def with_backoff(
    fn: Callable[[], list[dict]],
    retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> list[dict]:
    """Call ``fn``; on a transient error wait ``backoff_s * 2**attempt`` (+ up to 50%
    jitter) and try again, at most ``retries`` times. Other errors raise at once."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            sleep(backoff_s * 2**attempt * (1 + 0.5 * jitter()))
            attempt += 1


def search_youtube(term: str, n: int, timeout_s: float = 30.0, proxy: str | None = None) -> list:
    """yt-dlp's own YouTube search with flat extraction: one request, no video pages."""
    from yt_dlp import YoutubeDL

    params = base_ydl_params(timeout_s, proxy) | {
        "extract_flat": True,
        "skip_download": True,
        "extractor_retries": 0,  # retries are ours, with backoff
    }
    with YoutubeDL(params) as ydl:
        info = ydl.extract_info(f"ytsearch{n}:{term}", download=False)
    return list((info or {}).get("entries") or [])


def search_term(row: dict, cfg: Config, search: SearchFn = search_youtube) -> list[dict]:
    """Ray Data flat_map function: one term → its wanted rows (a failure row on error)."""
    term = row["term"]
    storage = Storage(cfg.storage.root)
    ic = cfg.index
    try:
        entries = with_backoff(
            lambda: search(
                term, ic.results_per_term, timeout_s=cfg.scrape.timeout_s, proxy=cfg.scrape.proxy
            ),
            ic.max_retries,
            ic.backoff_s,
        )
    except Exception as exc:
        reason = "rate_limited" if is_rate_limited(exc) else "search_error"
        failures.record_failure(storage, STAGE, term_item_id(term), "", reason, f"{term}: {exc}")
        return [_marker(row["order"], term, failed=True)]
    failures.clear_failure(storage, STAGE, term_item_id(term))
    rows = filter_entries(entries, term, ic)
    return [
        {**r, "term_order": row["order"], "rank": i, "failed": False} for i, r in enumerate(rows)
    ] or [_marker(row["order"], term, failed=False)]


def _marker(order: int, term: str, failed: bool) -> dict:
    """A row that carries no video, so every term reports back (same columns as the rest)."""
    empty = {"video_id": "", "url": "", "title": "", "channel": "", "duration_s": 0.0}
    return {**empty, "search_term": term, "source": "youtube", "term_order": order,
            "rank": -1, "failed": failed}  # fmt: skip


# -- local folder -------------------------------------------------------------------------------


def local_video_id(rel: str) -> str:
    """Id of a local file: readable, and distinct for distinct relative paths."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel).with_suffix("").as_posix()).strip("_")
    return f"local-{stem[:60] or 'file'}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def index_local(cfg: IndexConfig) -> list[dict]:
    """Every audio file under ``local_dir`` (any common container) as a ``file://`` row.

    Local files are taken as given: no duration filter. A file that turns out not to be
    audio is still listed, so the scrape records why it failed.
    """
    from voxtral.media import probe_duration

    root = resolve_path(cfg.local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"index.local_dir {root} is not a folder")
    rows = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        rows.append(
            {
                "video_id": local_video_id(rel),
                "url": path.resolve().as_uri(),
                "title": path.stem,
                "channel": "local",
                "duration_s": float(probe_duration(str(path)) or 0.0),
                "search_term": "",
                "source": "local",
            }
        )
    return rows


# -- the stage ----------------------------------------------------------------------------------


def existing_ids(storage: Storage) -> set[str]:
    table = storage.read_table("index", columns=["video_id"])
    return set(table.column("video_id").to_pylist()) if table is not None else set()


def write_rows(storage: Storage, rows: list[dict]) -> str | None:
    """Write new rows as one batch file (atomically); None when there is nothing new."""
    if not rows:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    rel = f"index/{stamp}-{hashlib.sha1(rows[0]['video_id'].encode()).hexdigest()[:6]}.parquet"
    keep = [{k: r[k] for k in schema.INDEX.names} for r in rows]
    storage.write_table(rel, pa.Table.from_pylist(keep, schema=schema.INDEX))
    return rel


METRICS = Metrics(
    videos=Metric("counter", "voxtral_index_videos", "Videos added to the index.", ("source",)),
    hours=Metric(
        "counter", "voxtral_index_hours", "Hours of audio added to the index.", ("source",)
    ),
)


def run_index(cfg: Config, search: SearchFn = search_youtube) -> dict:
    """Build (or extend) the index; returns a summary of what was found and added."""
    t0 = time.perf_counter()
    storage = Storage(cfg.storage.root)
    seen = existing_ids(storage)
    before = len(seen)
    failed_terms = 0
    if cfg.index.source == "local":
        terms: list[str] = []
        found = index_local(cfg.index)
    else:
        terms = read_terms(resolve_path(cfg.index.searches), cfg.index.max_terms)
        items = [{"term": t, "order": i} for i, t in enumerate(terms)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.flat_map(
            search_term,
            fn_kwargs={"cfg": cfg, "search": search},
            num_cpus=SEARCH_NUM_CPUS,
            compute=ray.data.TaskPoolStrategy(size=cfg.index.concurrency),
        )
        out = ds.take_all() if items else []
        failed_terms = sum(1 for r in out if r["failed"])
        # Ray returns rows in any order: sort back to term order and rank, so the first
        # term that found a video is the one recorded for it, run after run.
        found = sorted(
            (r for r in out if r["video_id"]), key=lambda r: (r["term_order"], r["rank"])
        )
    new = dedupe(found, seen)
    written = write_rows(storage, new)
    METRICS.record("videos", len(new), source=cfg.index.source)
    METRICS.record("hours", sum(r["duration_s"] for r in new) / 3600, source=cfg.index.source)
    return {
        "source": cfg.index.source,
        "terms": len(terms),
        "failed_terms": failed_terms,
        "found": len(found),
        "new": len(new),
        "duplicates": len(found) - len(new),
        "new_hours": sum(r["duration_s"] for r in new) / 3600,
        "index_videos": before + len(new),
        "written": written,
        "wall_s": time.perf_counter() - t0,
    }


def format_summary(summary: dict) -> str:
    return report.table(
        "index summary",
        [
            ("source", summary["source"]),
            ("search terms", f"{summary['terms']} ({summary['failed_terms']} failed)"),
            ("videos found", summary["found"]),
            ("new videos", f"{summary['new']} ({summary['new_hours']:.1f} h)"),
            ("duplicates skipped", summary["duplicates"]),
            ("videos in index", summary["index_videos"]),
            ("wall seconds", f"{summary['wall_s']:.1f}"),
        ],
    )
