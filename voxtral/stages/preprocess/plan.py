"""The preprocess plan on Ray Data, and its summary (see the package docstring)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import ray

from voxtral import failures, schema
from voxtral.codec import CodecInfo, codec_info, ensure_codec_record
from voxtral.config import Config, PreprocessConfig, TextConfig
from voxtral.ray_utils import read_parquet
from voxtral.schema import TOKENS_DIR
from voxtral.stages import report
from voxtral.stages.preprocess.steps import (
    PERMANENT_REASONS,
    STAGE,
    ChunkEncoder,
    decode_batch,
    write_batch,
)
from voxtral.stages.preprocess.transcribe import ChunkTranscriber
from voxtral.storage import Storage
from voxtral.words import needs_asr

log = logging.getLogger(__name__)


def done_chunk_ids(storage: Storage) -> set[str]:
    """Chunk ids that already have token rows."""
    table = storage.read_table(TOKENS_DIR, columns=["chunk_id"])
    return set() if table is None else set(table["chunk_id"].to_pylist())


@dataclass(frozen=True)
class Pending:
    """The chunks a run has to encode."""

    files: list[str]  # chunk files holding pending chunks
    inner_skip: frozenset[str]  # done or given-up chunk ids inside those files
    count: int
    asr: int  # how many of them Whisper transcribes (``text.source``)


def pending_chunks(storage: Storage, skip: set[str], text_source: str = "captions") -> Pending:
    """The chunks not in ``skip``. Reads only ids (and, under ``text.source=auto``, the
    caption words), so a rerun over a finished corpus reads no audio, and a corpus whose
    chunks all have captions starts no Whisper actor."""
    files = storage.parquet_files("chunks")
    if not files:
        return Pending([], frozenset(), 0, 0)
    columns = ["chunk_id", "__filename"] + (["captions"] if text_source == "auto" else [])
    table = pds.dataset(files, format="parquet", filesystem=storage.fs).to_table(columns=columns)
    captions = table["captions"].to_pylist() if text_source == "auto" else [None] * len(table)
    pending: set[str] = set()
    skipped_by_file: dict[str, list[str]] = {}
    count = asr = 0
    rows = zip(
        table["chunk_id"].to_pylist(), table["__filename"].to_pylist(), captions, strict=True
    )
    for cid, path, words in rows:
        if cid in skip:
            skipped_by_file.setdefault(path, []).append(cid)
        else:
            pending.add(path)
            count += 1
            asr += needs_asr(words, text_source)
    inner_skip = frozenset(c for p in pending for c in skipped_by_file.get(p, ()))
    return Pending(sorted(pending), inner_skip, count, asr)


def check_token_streams(storage: Storage, streams: int) -> None:
    """Refuse to add rows of another stream count to ``tokens/``: a chunk is encoded once
    per root (done by chunk id), so a root's single-stream rows would stand in for the
    two-stream rows asked for, silently, and training would refuse the folder."""
    for path in storage.parquet_files(TOKENS_DIR):
        made = schema.token_file_streams(pq.ParquetFile(path, filesystem=storage.fs).metadata)
        if made - {streams}:
            raise ValueError(
                f"{path} holds tokens made with tokenizer.streams={max(made - {streams})}, "
                f"and this run has tokenizer.streams={streams}: preprocess into a new "
                "storage.root (a root's chunks are encoded once)"
            )


def fit_actor_cpus(cluster_cpus: float, pools: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Per-actor CPUs for each pool (name → (CPUs per actor, smallest pool size)), scaled
    down so the pools at their smallest leave one CPU for the plan's tasks.

    Why: Ray Data starts the actor pools first and holds their CPUs. On a 2-CPU machine a
    1-CPU codec actor and a 1-CPU Whisper actor would hold both, the read task would never
    be scheduled, and the run would wait forever. A cluster that reports no CPUs (its
    autoscaler adds them) is left as configured."""
    asked = {name: cpus for name, (cpus, _) in pools.items()}
    need = sum(cpus * n for cpus, n in pools.values())
    room = cluster_cpus - 1
    if cluster_cpus <= 0 or need <= room:
        return asked
    if room <= 0:
        raise ValueError(
            f"the cluster has {cluster_cpus:g} CPU; preprocess needs more than 1 "
            "(one for its read, decode and write tasks, a share for each actor pool)"
        )
    return {name: cpus * room / need for name, cpus in asked.items()}


DUPLEX_BYTES_PER_SAMPLE = 40
"""What a two-stream decode task holds per sample of its window: FLAC and mix (2 + 2), two
examples' model and user tracks (float32 when split by gains: 16) and all of it packed
(float32: 20), against 6 for one stream."""


def decode_window(sort_window: int, streams: int = 1) -> int:
    """Chunks per decode task: ``preprocess.sort_window``, a sixth of it with two streams,
    so a task holds about the same memory either way (a task Ray cannot fit on a node is
    never scheduled, and the plan waits for ever)."""
    return sort_window if streams == 1 else max(1, sort_window // 6)


def decode_task_memory(window: int, max_chunk_s: float, sample_rate: int, streams: int = 1) -> int:
    """Bytes a decode task may hold at once: its window as FLAC, as PCM and packed (at most
    2 bytes a sample each, plus float32 for one chunk), and a worker's imports; two streams
    hold more (:data:`DUPLEX_BYTES_PER_SAMPLE`)."""
    samples = max_chunk_s * sample_rate
    per_sample = 6 if streams == 1 else DUPLEX_BYTES_PER_SAMPLE
    return int(window * samples * per_sample + samples * 8 + (768 << 20))


def run_preprocess(cfg: Config) -> dict[str, Any]:
    """Encode every chunk not yet in ``tokens/`` on the connected Ray; return the summary."""
    t0, t0_unix = time.perf_counter(), time.time()
    pre = cfg.preprocess
    storage = Storage(cfg.storage.root)
    info = codec_info(cfg.codec)
    ensure_codec_record(storage, cfg.codec)
    check_token_streams(storage, cfg.tokenizer.streams)
    done = done_chunk_ids(storage)
    failed = failures.read_failures(storage, STAGE)
    exhausted = failures.given_up(failed, pre.max_attempts, PERMANENT_REASONS) - done
    pending = pending_chunks(storage, done | exhausted, cfg.text.source)
    stats: list[pa.Table] = []
    if pending.files:
        plan = _plan(cfg, storage, pending, info, frozenset(r["item_id"] for r in failed))
        stats = list(plan.iter_batches(batch_format="pyarrow", batch_size=None))

    summary = summarize(stats, time.perf_counter() - t0, t0_unix, info)
    summary.update(already_done=len(done), skipped_failed=len(exhausted), pending=pending.count)
    return summary


def _plan(
    cfg: Config, storage: Storage, pending: Pending, info: CodecInfo, failed_before: frozenset[str]
) -> ray.data.Dataset:
    """The Ray Data plan over the pending chunk files: decode and pack (CPU tasks), Whisper
    where a chunk has no caption words (actors), the codec (actors), then the writer."""
    pre = cfg.preprocess
    _warn_if_no_gpus(pre, cfg.text, pending.asr > 0)
    pools = {"codec": (pre.num_cpus, pre.min_actors)}
    if pending.asr:
        pools["text"] = (cfg.text.num_cpus, cfg.text.min_actors)
    cpus = fit_actor_cpus(ray.cluster_resources().get("CPU", 0.0), pools)
    if cpus != {name: c for name, (c, _) in pools.items()}:
        log.warning("a small cluster: actor CPUs scaled to %s so the tasks can run", cpus)
    columns = ["chunk_id", "video_id", "audio", "captions"]
    # chunks scraped with speakers (chunk files from before diarisation have no turns;
    # two streams then make no rows: each chunk fails with no_speakers)
    names = [set(storage.parquet_schema(f).names) for f in pending.files]
    columns += [c for c in ("turns", "channels") if all(c in n for n in names)]
    ds = read_parquet(pending.files, storage.fs, columns)
    window = decode_window(pre.sort_window, cfg.tokenizer.streams)
    ds = ds.map_batches(
        decode_batch,
        batch_size=window,
        batch_format="pyarrow",
        fn_kwargs={
            "sample_rate": info.sample_rate,
            "hop": info.hop,
            "batch_size": pre.batch_size,
            "max_pad": pre.max_pad,
            "skip": pending.inner_skip,
            "streams": cfg.tokenizer.streams,
        },
        num_cpus=1,
        # Declared so Ray packs no more decode tasks on a node than its memory holds.
        # It also keeps decoding in CPU tasks: Ray Data would otherwise fuse it into the
        # codec actors, where it would stall the GPU.
        memory=decode_task_memory(
            window, cfg.scrape.max_chunk_s, info.sample_rate, cfg.tokenizer.streams
        ),
    )
    if pending.asr:  # else no Whisper actor: every pending chunk has caption words
        ds = ds.map_batches(
            ChunkTranscriber,
            fn_constructor_kwargs={"text": cfg.text, "sample_rate": info.sample_rate},
            batch_size=1,  # one packed batch per call, as the codec actors take them
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=cfg.text.min_actors, max_size=cfg.text.max_actors
            ),
            num_gpus=cfg.text.num_gpus,
            num_cpus=cpus["text"],
        )
    ds = ds.map_batches(
        ChunkEncoder,
        fn_constructor_kwargs={"codec_cfg": cfg.codec, "pre": pre},
        batch_size=1,  # one packed codec batch per call
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pre.min_actors, max_size=pre.max_actors),
        num_gpus=pre.num_gpus,
        num_cpus=cpus["codec"],
    )
    ds = ds.map_batches(
        write_batch,
        batch_size=pre.write_rows,
        batch_format="pyarrow",
        fn_kwargs={
            "root": storage.root_uri,
            "base": cfg.model.base,
            "failed_before": failed_before,
        },
    )
    return ds


def _warn_if_no_gpus(pre: PreprocessConfig, text: TextConfig, asr: bool) -> None:
    if ray.cluster_resources().get("GPU"):
        return
    if pre.num_gpus > 0:
        log.warning(
            "preprocess.num_gpus=%s but the cluster has no GPU now; the codec actors wait "
            "for one (set preprocess.num_gpus=0 to encode on CPU)",
            pre.num_gpus,
        )
    if asr and text.num_gpus > 0:
        log.warning(
            "text.num_gpus=%s but the cluster has no GPU now; the ASR actors wait for one "
            "(set text.num_gpus=0 to transcribe on CPU)",
            text.num_gpus,
        )


def summarize(
    stats: Sequence[pa.Table], wall_s: float, t0_unix: float, info: CodecInfo
) -> dict[str, Any]:
    """The writers' outcome rows → counts, audio hours and x-realtime of this run.

    ``first_codes_s`` is the start-up (planning, workers, codec load, first window);
    ``steady_xrt`` the rate from the first codes on, what a long run tends to."""
    rows = [r for t in stats for r in t.to_pylist()]
    ok = [r for r in rows if r["reason"] is None]
    reasons = Counter(r["reason"] for r in rows if r["reason"] is not None)
    seconds = sum(r["seconds"] for r in ok)
    stamps = [r["encoded_at"] for r in ok]
    first = min(stamps) - t0_unix if stamps else 0.0
    # rows stamped at the first call were encoded before it: count them out of the rate
    after_first = sum(r["seconds"] for r in ok if r["encoded_at"] > min(stamps, default=0))
    span = max(stamps, default=0) - min(stamps, default=0)
    text_seconds = {k: 0.0 for k in schema.TEXT_SOURCES}
    for r in ok:
        text_seconds[r.get("text_source") or "none"] += r["seconds"]
    return {
        "stage": STAGE,
        "codec": info.name,
        "n_q": info.n_q,
        "chunks": len(ok),
        "failures": sum(reasons.values()),
        "failures_by_reason": dict(sorted(reasons.items())),
        "audio_hours": seconds / 3600,
        "wall_s": wall_s,
        "xrt": seconds / wall_s if wall_s > 0 else 0.0,
        "first_codes_s": first,
        "steady_xrt": after_first / span if span > 0 else 0.0,
        "text_seconds": text_seconds,
        "text_share": {k: v / seconds if seconds else 0.0 for k, v in text_seconds.items()},
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary table printed at the end of the stage."""
    return report.table(
        "preprocess summary",
        [
            ("codec", f"{s['codec']} (n_q={s['n_q']})"),
            ("chunks encoded", s["chunks"]),
            ("already done", s.get("already_done", 0)),
            ("failures", f"{s['failures']}{report.by_reason(s['failures_by_reason'])}"),
            ("skipped (max attempts)", s.get("skipped_failed", 0)),
            ("audio hours", f"{s['audio_hours']:.3f}"),
            ("wall time (s)", f"{s['wall_s']:.1f}"),
            ("x-realtime", f"{s['xrt']:.1f}"),
            ("first codes after (s)", f"{s['first_codes_s']:.1f}"),
            ("x-realtime after that", f"{s['steady_xrt']:.1f}"),
            ("words (share of audio)", format_coverage(s.get("text_share", {}))),
        ],
    )


def format_coverage(share: dict[str, float]) -> str:
    """``captions 62.0% · asr 30.1% · none 7.9%``: where the words of this run's audio came
    from."""
    return " · ".join(f"{k} {100 * share.get(k, 0.0):.1f}%" for k in schema.TEXT_SOURCES)
