"""Stage 2, scrape: index rows → ``chunks/<video_id>.parquet``.

One video per task. The task downloads the best audio stream (``voxtral.download``) and
cuts it into chunk rows (``voxtral.cut``: decoded as a stream, VAD, chunks cut at pauses,
FLAC, caption words, speaker turns) in a temporary Parquet file that is moved into place
only when the whole video succeeded. So memory is bounded by a few minutes of audio
whatever the video's length, and a task killed halfway leaves nothing.

A failure is a ``failures/scrape`` row with a reason, never a crashed job; a rerun skips
finished videos and retries failed ones until ``scrape.max_attempts``. The attempt is
counted before the work starts, so a task killed on the way (out of memory, a lost node)
still uses one: its row says ``interrupted``. A video whose diarisation failed keeps its
chunks, and a ``failures/diarize`` row says why.

Hostile media are bounded too: any sample rate resamples in a few MB
(``voxtral.audio.resample``), downloads stop at ``scrape.max_download_mb`` and audio past
``index.max_duration_s`` (announced or decoded) fails as ``too_long``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray
import torch

from voxtral import failures, schema
from voxtral.audio import AudioError
from voxtral.captions import CaptionIndex, parse_vtt
from voxtral.config import Config
from voxtral.cut import cut_audio
from voxtral.download import (
    check_url,
    classify,
    download,
    local_file,
    resolve_path,
)
from voxtral.media import CorruptAudioError, NotAudioError
from voxtral.metrics import Metric, Metrics
from voxtral.stages import report
from voxtral.storage import Storage

STAGE = "scrape"
DIARIZE_FAILURES = "diarize"
"""``failures/diarize/``: videos scraped whole whose diarisation failed (chunks kept)."""
TMP_PREFIX = "voxtral-scrape-"


def chunks_rel(video_id: str) -> str:
    return f"chunks/{schema.safe_name(video_id)}.parquet"


# -- per video -----------------------------------------------------------------------------


def _load_captions(row: dict, fetched_vtt: str | None, local_root: Path | None) -> CaptionIndex:
    text = fetched_vtt
    if row.get("source") == "local" and local_root is not None:
        sidecar = local_file(row["url"], local_root).with_suffix(".vtt")
        text = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else None
    if not text:
        return CaptionIndex([])
    try:
        return CaptionIndex(parse_vtt(text))
    except Exception:  # a broken caption file costs the captions, not the audio
        return CaptionIndex([])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotAudioError):
        return "not_audio"
    if isinstance(exc, CorruptAudioError):
        return "corrupt"
    if isinstance(exc, AudioError):
        return "empty"
    return classify(exc)


def scrape_video(row: dict, cfg: Config, storage: Storage | None = None) -> dict:
    """Scrape one index row; never raises: a failure is recorded and returned as data.

    Returns ``{video_id, status: done|failed|skipped, reason, error, audio_s, chunks,
    speech_s, wall_s, diarization, diarize_error, speakers, overlap_s,
    speakers_per_chunk}``. A video whose diarisation fails is still ``done``: its chunks
    (audio, captions) are good training data for the one-stream model, so they are kept
    with empty turns and ``diarization="failed"``, a ``failures/diarize/<video>`` row says
    why, and the summary counts the video (``diarize_failed``); a two-speaker consumer
    filters on the column. A rerun does not diarise finished videos again.
    """
    t0 = time.perf_counter()
    storage = storage or Storage(cfg.storage.root)
    video_id = row["video_id"]
    result = {"video_id": video_id, "status": "done", "reason": "", "error": "",
              "audio_s": 0.0, "chunks": 0, "speech_s": 0.0, "wall_s": 0.0,
              "diarization": "", "diarize_error": "", "speakers": 0, "overlap_s": 0.0,
              "speakers_per_chunk": {}}  # fmt: skip
    rel = chunks_rel(video_id)
    if storage.exists(rel):
        result["status"] = "skipped"
        return result
    local_root = resolve_path(cfg.index.local_dir) if row.get("source") == "local" else None
    before = failures.read_failure(storage, STAGE, video_id)
    if before and before["attempts"] >= cfg.scrape.max_attempts:
        # Only a retry of a task that died mid-way (Ray retries killed tasks) gets here:
        # the plan leaves such videos out. Doing the work again would kill it again.
        result.update(status="failed", reason=before["reason"])
        result["error"] = f"out of attempts ({before['attempts']}): {before['error']}"[:2000]
        return result
    # Counted before the work: a task killed on the way still used an attempt.
    failures.begin_attempt(storage, STAGE, video_id, video_id)
    try:
        if cfg.scrape.tmp_dir:
            os.makedirs(cfg.scrape.tmp_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=cfg.scrape.tmp_dir) as tmp:
            try:
                out_path, figures = _fetch_and_cut(row, cfg, tmp, local_root)
                storage.put_file(rel, out_path)
            except Exception as exc:  # every failure becomes a row, whatever raised it
                result.update(status="failed", reason=_reason(exc))
                result["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            else:
                result.update({k: figures[k] for k in (
                    "audio_s", "chunks", "speech_s", "diarization", "diarize_error", "speakers",
                    "overlap_s", "speakers_per_chunk")})  # fmt: skip
        if result["status"] == "failed":
            failures.record_failure(
                storage,
                STAGE,
                video_id,
                video_id,
                result["reason"],
                result["error"],
                new_attempt=False,
            )
        else:
            failures.clear_failure(storage, STAGE, video_id)
            if result["diarization"] == "failed":  # the chunks are kept: a row says why
                failures.record_failure(storage, DIARIZE_FAILURES, video_id, video_id,
                                        "diarize_error", result["diarize_error"])  # fmt: skip
    finally:
        result["wall_s"] = time.perf_counter() - t0
    return result


def _fetch_and_cut(row: dict, cfg: Config, tmp: str, local_root: Path | None) -> tuple[str, dict]:
    """Download the row's audio (and captions) into ``tmp`` and cut it into a chunk file
    there; that file's path and the figures of ``cut_audio``. Raises on any failure."""
    check_url(row["url"], row.get("source", ""), local_root, cfg.scrape.allow_private_hosts)
    got = download(
        row["url"],
        tmp,
        cfg.scrape,
        allow_file=local_root is not None,
        max_duration_s=cfg.index.max_duration_s,
    )
    captions = _load_captions(row, got.captions_vtt, local_root) if cfg.scrape.captions else None
    out_path = os.path.join(tmp, "chunks.parquet")
    figures = cut_audio(
        got.path, row["video_id"], cfg, out_path, captions, row.get("duration_s") or None
    )
    return out_path, figures


# -- on Ray ----------------------------------------------------------------------------------


METRICS = Metrics(
    videos=Metric("counter", "voxtral_scrape_videos", "Videos scraped, by status.", ("status",)),
    hours=Metric("counter", "voxtral_scrape_audio_hours", "Hours of audio decoded and cut."),
    chunk_hours=Metric("counter", "voxtral_scrape_chunk_hours", "Hours of audio kept as chunks."),
    failures=Metric("counter", "voxtral_scrape_failures", "Failed videos, by reason.", ("reason",)),
    diarized=Metric(
        "counter",
        "voxtral_scrape_diarized_videos",
        "Videos by how their speakers were found.",
        ("method",),
    ),
    speaker_chunks=Metric(
        "counter",
        "voxtral_scrape_chunks_by_speakers",
        "Chunks by how many speakers they hold.",
        ("speakers",),
    ),
    overlap_hours=Metric(
        "counter", "voxtral_scrape_overlap_hours", "Hours during which two speakers talk at once."
    ),
)


def _scrape_task(row: dict, cfg: Config) -> dict:
    """Ray Data map function: one video per call, one core's worth of threads."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # parallelism comes from tasks, not from threads inside one
    out = scrape_video(row, cfg)
    METRICS.record("videos", 1, status=out["status"])
    METRICS.record("hours", out["audio_s"] / 3600)
    METRICS.record("chunk_hours", out["speech_s"] / 3600)
    if out["status"] == "failed":
        METRICS.record("failures", 1, reason=out["reason"])
    if out["status"] == "done":
        METRICS.record("diarized", 1, method=out["diarization"])
        for n, count in out["speakers_per_chunk"].items():
            METRICS.record("speaker_chunks", count, speakers=n)
        METRICS.record("overlap_hours", out["overlap_s"] / 3600)
    return out


def plan(storage: Storage, cfg: Config) -> tuple[list[dict], dict]:
    """Index rows still to scrape, and how many were skipped (done, out of attempts)."""
    table = storage.read_table("index")
    rows = table.to_pylist() if table is not None else []
    done = {n[: -len(".parquet")] for n in storage.listdir("chunks", suffix=".parquet")}
    given_up = failures.given_up(failures.read_failures(storage, STAGE), cfg.scrape.max_attempts)
    todo, seen = [], set()
    skipped = {"done_before": 0, "out_of_attempts": 0}
    for r in rows:
        vid = r["video_id"]
        if vid in seen:
            continue
        seen.add(vid)
        if schema.safe_name(vid) in done:
            skipped["done_before"] += 1
        elif vid in given_up:
            skipped["out_of_attempts"] += 1
        else:
            todo.append(r)
    return todo, {"index_videos": len(seen), **skipped}


def _alive_nodes() -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")))


def summarize(results: list[dict], wall_s: float, counts: dict) -> dict:
    """The stage's summary: videos done / failed by reason, hours, x-realtime."""
    by_status = Counter(r["status"] for r in results)
    reasons = Counter(r["reason"] for r in results if r["status"] == "failed")
    audio_s = sum(r["audio_s"] for r in results)
    done = [r for r in results if r["status"] == "done"]
    per_chunk: Counter = Counter()
    for r in done:
        per_chunk.update({int(k): v for k, v in r.get("speakers_per_chunk", {}).items()})
    n_chunks = sum(per_chunk.values())
    speech_s = sum(r["speech_s"] for r in done)
    return {
        **counts,
        "attempted": len(results),
        "done": by_status.get("done", 0),
        "failed": by_status.get("failed", 0),
        "failed_by_reason": dict(sorted(reasons.items())),
        "chunks": sum(r["chunks"] for r in results),
        "audio_hours": audio_s / 3600,
        "chunk_speech_hours": sum(r["speech_s"] for r in results) / 3600,
        "wall_s": wall_s,
        "xrt": audio_s / wall_s if wall_s > 0 else 0.0,
        "diarized_by": dict(sorted(Counter(r.get("diarization", "") for r in done).items())),
        "diarize_failed": sum(r.get("diarization") == "failed" for r in done),
        "channel_split_videos": sum(r.get("diarization") == "channels" for r in done),
        "chunks_by_speakers": dict(sorted(per_chunk.items())),
        "speakers_per_chunk": sum(k * v for k, v in per_chunk.items()) / n_chunks
        if n_chunks
        else 0.0,
        "overlap_share": sum(r.get("overlap_s", 0.0) for r in done) / speech_s if speech_s else 0.0,
    }


def run_scrape(cfg: Config) -> dict:
    """Scrape every index row not yet done, as a Ray Data plan; returns the summary."""
    storage = Storage(cfg.storage.root)
    todo, counts = plan(storage, cfg)
    t0 = time.perf_counter()
    results: list[dict] = []
    if todo:
        concurrency = max(1, min(len(todo), cfg.scrape.concurrency * _alive_nodes()))
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map(
            _scrape_task,
            fn_kwargs={"cfg": cfg},
            num_cpus=cfg.scrape.num_cpus,
            compute=ray.data.TaskPoolStrategy(size=concurrency),
        )
        results = ds.take_all()
    return summarize(results, time.perf_counter() - t0, counts)


def format_summary(summary: dict) -> str:
    """The end-of-stage table: counts, failures by reason, hours, x-realtime."""
    return report.table(
        "scrape summary",
        [
            ("videos in index", summary["index_videos"]),
            ("skipped: already done", summary["done_before"]),
            ("skipped: out of attempts", summary["out_of_attempts"]),
            ("scraped now", summary["done"]),
            ("failed now", f"{summary['failed']}{report.by_reason(summary['failed_by_reason'])}"),
            ("chunks written", summary["chunks"]),
            ("audio hours", f"{summary['audio_hours']:.3f}"),
            ("speech hours in chunks", f"{summary['chunk_speech_hours']:.3f}"),
            ("diarised by", report.by_reason(summary["diarized_by"]).strip() or "-"),
            ("diarisation failed (chunks kept)", summary["diarize_failed"]),
            ("split by channel", summary["channel_split_videos"]),
            ("speakers per chunk", f"{summary['speakers_per_chunk']:.2f}"),
            ("overlap share of speech", f"{summary['overlap_share']:.1%}"),
            ("wall seconds", f"{summary['wall_s']:.1f}"),
            ("x-realtime", f"{summary['xrt']:.0f}"),
        ],
    )
