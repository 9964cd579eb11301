"""Scrape: real files over a loopback HTTP server, through the real Ray Data plan.

Good files (WAV, MP3, Ogg/Opus, M4A/AAC; mono and stereo; 8 to 48 kHz) must yield chunks
that cover their speech, decode from FLAC at the codec rate and match the source audio;
every bad one (404, 403, too slow, cut off, half a file, zero bytes, text, garbage, an hour
of silence) exactly one failure row with the right reason. Reruns add nothing; fixing the
server completes what failed; a node removed mid-scrape loses nothing and duplicates nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pytest
import torch
from _scrape_media import Route, copy_sample, encode, loop_speech, sample_speech, serve, silent_hour

from voxtral import failures
from voxtral.audio import StreamResampler, flac_decode, resample
from voxtral.captions import CaptionIndex, parse_vtt
from voxtral.chunking import ChunkPlanner
from voxtral.config import REPO_ROOT, Config, load_config
from voxtral.cut import cut_audio, target_sample_rate
from voxtral.download import (
    ScrapeFailure,
    base_ydl_params,
    check_url,
    classify,
    is_rate_limited,
    is_transient,
    ydl_params,
)
from voxtral.media import CorruptAudioError, NotAudioError, decode_stream
from voxtral.stages.index import index_local, write_rows
from voxtral.stages.scrape import chunks_rel, format_summary, run_scrape, scrape_video
from voxtral.storage import Storage
from voxtral.vad import FRAME_S, hysteresis

SR = 24000
MIN_S, MAX_S = 5.0, 12.0
PAD_S = 0.25

# name → (sample dialogue, seconds, rate, codec, container, stereo, bit rate)
GOOD = {
    "wav16k_stereo.wav": ("podcast_en", 30, 16000, "pcm_s16le", "wav", True, None),
    "mp3_44k_stereo.mp3": ("interview_en", 30, 44100, "libmp3lame", "mp3", True, 64000),
    "opus48k_mono.ogg": ("charla_es", 28, 48000, "libopus", "ogg", False, 32000),
    "aac8k_mono.m4a": ("debat_fr", 28, 8000, "aac", "mp4", False, 24000),
}
FLAKY = "flaky22k_mono.mp3"  # 503 until the server is fixed
EXPECTED_FAILURES = {
    "missing.mp3": "http_404",
    "forbidden.m4a": "http_403",
    "slow.ogg": "timeout",
    "cut.mp3": "truncated",
    "half.wav": "truncated",
    "zero.mp3": "empty",
    "notes.mp3": "not_audio",
    "garbage.m4a": "corrupt",
    "silence.mp3": "no_speech",
}


def video_id(name: str) -> str:
    return "v-" + name.replace(".", "-")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("media")
    speech, files = {}, {}
    for name, (stem, secs, rate, codec, fmt, stereo, br) in GOOD.items():
        speech[name] = sample_speech(stem, secs)
        files[name] = encode(d / name, speech[name].audio, rate, codec, fmt, stereo, br)
    speech[FLAKY] = sample_speech("callin_de", 27)  # its tail chunk is longer than MIN_S
    files[FLAKY] = encode(d / FLAKY, speech[FLAKY].audio, 22050, "libmp3lame", "mp3")
    full = d / "full.wav"
    encode(full, speech["wav16k_stereo.wav"].audio, 16000, "pcm_s16le", "wav", True)
    data = full.read_bytes()
    (d / "half.wav").write_bytes(data[: len(data) // 2])  # the header still says 30 s
    (d / "zero.mp3").write_bytes(b"")
    (d / "notes.mp3").write_text("These are my notes for the show.\nNot audio at all.\n" * 40)
    (d / "garbage.m4a").write_bytes(np.random.default_rng(0).bytes(50_000))
    silent_hour(d / "silence.mp3")
    return {"dir": d, "speech": speech, "files": files}


@pytest.fixture(scope="module")
def server(media):
    d = media["dir"]
    routes = {name: Route("file", d / name) for name in GOOD}
    routes |= {
        FLAKY: Route("flaky", d / FLAKY),
        "missing.mp3": Route("status", status=404),
        "forbidden.m4a": Route("status", status=403),
        "slow.ogg": Route("slow", d / "opus48k_mono.ogg", delay_s=4.0),
        "cut.mp3": Route("cut", d / "mp3_44k_stereo.mp3"),
        "half.wav": Route("file", d / "half.wav"),
        "zero.mp3": Route("file", d / "zero.mp3"),
        "notes.mp3": Route("file", d / "notes.mp3"),
        "garbage.m4a": Route("file", d / "garbage.m4a"),
        "silence.mp3": Route("file", d / "silence.mp3"),
    }
    srv = serve(routes)
    yield srv
    srv.close()


def make_cfg(root: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"storage.root={root / 'run'}",
            f"scrape.tmp_dir={root / 'tmp'}",
            f"scrape.min_chunk_s={MIN_S}",
            f"scrape.max_chunk_s={MAX_S}",
            "scrape.timeout_s=1.5",
            "scrape.retries=0",
            "scrape.max_attempts=3",
            "scrape.concurrency=2",
            # The media server is on 127.0.0.1 and its rows are "youtube" rows (the HTTP
            # path), which a real index must not point at loopback: allowed for tests only.
            "scrape.allow_private_hosts=true",
            *overrides,
        ],
        env={},
    )


def index_rows(server, media) -> list[dict]:
    rows = []
    for name in [*GOOD, FLAKY, *EXPECTED_FAILURES]:
        if name in media["speech"]:
            duration = media["speech"][name].seconds
        elif name == "half.wav":
            duration = media["speech"]["wav16k_stereo.wav"].seconds
        elif name == "silence.mp3":
            duration = 3600.0
        else:
            duration = 0.0
        rows.append(
            {
                "video_id": video_id(name),
                "url": server.url(name),
                "title": f"{name}; rm -rf / && echo $(whoami)",  # never used for anything
                "channel": "loopback",
                "duration_s": duration,
                "search_term": "test",
                "source": "youtube",
            }
        )
    return rows


def chunk_files(storage: Storage) -> dict[str, float]:
    return {n: os.path.getmtime(storage.path("chunks", n)) for n in storage.listdir("chunks")}


@pytest.fixture(scope="module")
def passes(tmp_path_factory, server, media, ray_session) -> dict:
    """Four runs: first, unchanged rerun, after fixing the server, out of attempts."""
    root = tmp_path_factory.mktemp("scrape")
    cfg = make_cfg(root)
    storage = Storage(cfg.storage.root)
    write_rows(storage, index_rows(server, media))
    out = {"cfg": cfg, "storage": storage}
    out["first"] = run_scrape(cfg)
    out["chunks_first"] = storage.read_table("chunks")
    out["files_first"] = chunk_files(storage)
    out["failures_first"] = failures.read_failures(storage, "scrape")
    out["second"] = run_scrape(cfg)
    out["files_second"] = chunk_files(storage)
    out["failures_second"] = failures.read_failures(storage, "scrape")
    server.fixed = True
    try:
        out["third"] = run_scrape(cfg)
    finally:
        server.fixed = False
    out["failures_third"] = failures.read_failures(storage, "scrape")
    out["fourth"] = run_scrape(cfg)
    return out


# -- the stage, end to end ------------------------------------------------------------------------


def test_good_files_become_chunks_that_cover_their_speech(passes, media):
    first, table = passes["first"], passes["chunks_first"]
    assert first["done"] == len(GOOD), first
    rows = table.to_pylist()
    for name in GOOD:
        speech = media["speech"][name]
        mine = sorted(
            (r for r in rows if r["video_id"] == video_id(name)), key=lambda r: r["start_s"]
        )
        assert mine, name
        for r in mine:
            assert MIN_S - FRAME_S <= r["duration_s"] <= MAX_S + 1e-6, (name, r["duration_s"])
            assert r["sample_rate"] == SR and r["speech_ratio"] >= 0.3
            assert r["captions"] == []  # plain HTTP files have no captions
        spans = [(r["start_s"], r["start_s"] + r["duration_s"]) for r in mine]
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:], strict=False))
        # every spoken clause lies inside exactly one chunk: cuts fall in pauses
        for a, b in speech.cues:
            holders = [s for s in spans if s[0] - 0.06 <= a and b <= s[1] + 0.06]
            assert len(holders) == 1, (name, (a, b), spans)
        # and the chunks add up to the speech plus its pauses, not to the silence around
        total = sum(r["duration_s"] for r in mine)
        span = speech.cues[-1][1] - speech.cues[0][0]
        assert speech.speech_s <= total <= span + 2 * PAD_S + 0.2, (name, total, span)


def test_chunk_audio_decodes_at_the_codec_rate_and_matches_the_source(passes, media):
    table = passes["chunks_first"]
    for name in GOOD:
        src = np.concatenate(list(decode_stream(str(media["files"][name]), SR)))
        for r in table.to_pylist():
            if r["video_id"] != video_id(name):
                continue
            wav, sr = flac_decode(r["audio"])
            assert sr == SR == target_sample_rate(passes["cfg"])
            a = round(r["start_s"] * SR)
            assert len(wav) == round(r["duration_s"] * SR)
            np.testing.assert_allclose(wav, np.clip(src[a : a + len(wav)], -1, 1), atol=2e-4)


def test_every_bad_file_is_one_failure_row_with_its_reason(passes):
    first = passes["first"]
    rows = passes["failures_first"]
    got = {r["item_id"]: r for r in rows}
    expected = {video_id(n): reason for n, reason in EXPECTED_FAILURES.items()}
    expected[video_id(FLAKY)] = "http_503"
    assert len(rows) == len(got) == len(expected)
    assert {k: r["reason"] for k, r in got.items()} == expected
    assert all(r["attempts"] == 1 and r["stage"] == "scrape" and r["error"] for r in rows)
    assert first["failed"] == len(expected)
    assert sum(first["failed_by_reason"].values()) == len(expected)
    written = set(passes["files_first"])
    assert written == {f"{video_id(n)}.parquet" for n in GOOD}  # nothing of a failed video


def test_rerun_adds_nothing_and_counts_the_retries(passes):
    second = passes["second"]
    assert second["done"] == 0 and second["done_before"] == len(GOOD)
    assert passes["files_second"] == passes["files_first"]  # not even rewritten
    assert {r["item_id"]: r["attempts"] for r in passes["failures_second"]} == {
        r["item_id"]: 2 for r in passes["failures_first"]
    }


def test_second_pass_after_fixing_the_server_completes_the_failure(passes, media):
    third, storage = passes["third"], passes["storage"]
    assert third["done"] == 1 and third["failed"] == len(EXPECTED_FAILURES)
    assert storage.exists(chunks_rel(video_id(FLAKY)))
    left = {r["item_id"]: r["attempts"] for r in passes["failures_third"]}
    assert left == {video_id(n): 3 for n in EXPECTED_FAILURES}
    chunks = storage.read_table("chunks")
    ids = chunks.column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids))
    flaky = [r for r in chunks.to_pylist() if r["video_id"] == video_id(FLAKY)]
    assert sum(r["duration_s"] for r in flaky) >= media["speech"][FLAKY].speech_s


def test_out_of_attempts_is_left_alone(passes):
    fourth = passes["fourth"]
    assert fourth["attempted"] == 0
    table = format_summary(passes["first"])
    assert "x-realtime" in table and "http_404: 1" in table and "no_speech: 1" in table
    assert fourth["out_of_attempts"] == len(EXPECTED_FAILURES)
    assert fourth["done_before"] == len(GOOD) + 1


def test_temporary_folders_are_removed(passes):
    tmp = Path(passes["cfg"].scrape.tmp_dir)
    assert tmp.is_dir() and list(tmp.iterdir()) == []
    chunks = Path(passes["storage"].path("chunks"))
    assert all(p.suffix == ".parquet" and not p.name.startswith(".") for p in chunks.iterdir())


def test_local_corpus_captions_fall_in_the_right_chunk(tmp_path, ray_session, capsys):
    """The local source end to end: index the sample corpus, scrape it, check captions."""
    corpus = copy_sample(tmp_path / "corpus")
    cfg = make_cfg(tmp_path, f"index.local_dir={corpus}", "index.source=local")
    from voxtral.stages.index import run_index

    assert run_index(cfg)["new"] == 5
    spec = importlib.util.spec_from_file_location("jobs_scrape", REPO_ROOT / "jobs" / "scrape.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = [f"--set=scrape.{k}={v}" for k, v in cfg.model_dump()["scrape"].items() if v is not None]
    argv += [f"--set=storage.root={cfg.storage.root}", f"--set=index.local_dir={corpus}"]
    summary = job.main(argv)  # the job entry point, as `ray job submit` runs it
    assert summary["done"] == 5 and summary["failed"] == 0, summary
    assert "scrape summary" in capsys.readouterr().out
    index = {r["video_id"]: r for r in Storage(cfg.storage.root).read_table("index").to_pylist()}
    table = Storage(cfg.storage.root).read_table("chunks").to_pylist()
    for vid, row in index.items():
        path = Path(unquote(urlparse(row["url"]).path))
        words = parse_vtt(path.with_suffix(".vtt").read_text(encoding="utf-8"))
        mine = [r for r in table if r["video_id"] == vid]
        assert mine
        n_inside = 0
        for r in mine:
            start, end = r["start_s"], r["start_s"] + r["duration_s"]
            inside = [w for w in words if start <= (w.start_s + w.end_s) / 2 < end]
            n_inside += len(inside)
            assert [c["word"] for c in r["captions"]] == [w.word for w in inside]
            for c, w in zip(r["captions"], inside, strict=True):
                assert 0 <= c["start_s"] <= c["end_s"] <= r["duration_s"] + 1e-3
                assert abs(c["start_s"] + start - w.start_s) < 2e-3
        # the cuts are in pauses, so almost every word lands in some chunk
        assert n_inside >= 0.95 * len(words), (vid, n_inside, len(words))


def test_a_killed_task_leaves_nothing_and_the_rerun_completes(tmp_path, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long = loop_speech(["podcast_en", "interview_en"], 240)
    encode(corpus / "long.ogg", long.audio, 48000, "libopus", "ogg", bit_rate=24000)
    cfg = make_cfg(tmp_path, f"index.local_dir={corpus}", "index.source=local")
    (row,) = index_local(cfg.index)
    storage = Storage(cfg.storage.root)
    code = (
        "import sys, json; from voxtral.config import Config; from voxtral.stages.scrape import "
        "scrape_video; cfg = Config.model_validate_json(sys.argv[1]); "
        "scrape_video(json.loads(sys.argv[2]), cfg)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, cfg.model_dump_json(), json.dumps(row)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp = Path(cfg.scrape.tmp_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp.glob("*/media.*")):
        assert proc.poll() is None, "the task ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.exists(chunks_rel(row["video_id"]))
    assert storage.listdir("chunks") == []
    # The attempt was counted before the work started, so the killed one still counts.
    (failed,) = failures.read_failures(storage, "scrape")
    assert (failed["item_id"], failed["reason"], failed["attempts"]) == (
        row["video_id"],
        "interrupted",
        1,
    )
    # A task that keeps getting killed (Ray retries it) stops at scrape.max_attempts with
    # its row, without doing the work again, so the stage finishes.
    once = make_cfg(tmp_path, f"index.local_dir={corpus}", "scrape.max_attempts=1")
    out = scrape_video(row, once)
    assert (out["status"], out["reason"], out["audio_s"]) == ("failed", "interrupted", 0.0)
    assert failures.read_failures(storage, "scrape")[0]["attempts"] == 1
    out = scrape_video(row, cfg)
    assert out["status"] == "done" and out["chunks"] >= math.floor(long.speech_s / MAX_S)
    assert failures.read_failures(storage, "scrape") == []


ODD = {  # name → (rate, channels, codec): the rates and layouts that used to kill a worker
    "rate1hz.wav": (1, 1),
    "rate2401.wav": (2401, 1),
    "rate47999.wav": (47999, 1),
    "rate384k.wav": (384000, 1),
    "ch8_48k.wav": (48000, 8),
}
CAP_MB = 768
"""Address space a capped scrape may add to what its imports and a first video took."""
CAPPED = """
import json, resource, sys
from voxtral.config import Config
from voxtral.stages.scrape import scrape_video
cfg = Config.model_validate_json(sys.argv[1])
warm, *rows = json.loads(sys.argv[2])
assert scrape_video(warm, cfg)["status"] == "done"  # imports, silero, yt-dlp: all loaded
vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize:"))
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ((vm << 10) + (int(sys.argv[3]) << 20), hard))
print(json.dumps([scrape_video(r, cfg) for r in rows]))
"""


def _rows(srv, names: list[str], seconds: float = 20.0) -> list[dict]:
    return [
        {"video_id": video_id(n), "url": srv.url(n), "title": n, "channel": "loopback",
         "duration_s": seconds, "search_term": "test", "source": "youtube"}
        for n in names
    ]  # fmt: skip


def test_odd_rates_and_channels_scrape_in_bounded_memory(tmp_path):
    """1 Hz to 384 kHz and 8 channels, each scraped under an address-space cap: a chunk or
    a failure row for its content, never an allocation failure or a dead process."""
    speech = sample_speech("podcast_en", 20)
    media = tmp_path / "media"
    media.mkdir()
    encode(media / "warm.wav", speech.audio, SR, "pcm_s16le", "wav")
    for name, (rate, channels) in ODD.items():
        encode(media / name, speech.audio, rate, "pcm_s16le", "wav", channels=channels)
    srv = serve({n: Route("file", media / n) for n in ["warm.wav", *ODD]})
    try:
        cfg = make_cfg(tmp_path)
        rows = _rows(srv, ["warm.wav", *ODD])
        proc = subprocess.run(
            [sys.executable, "-c", CAPPED, cfg.model_dump_json(), json.dumps(rows), str(CAP_MB)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        srv.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["video_id"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    storage = Storage(cfg.storage.root)
    rows_failed = {r["item_id"]: r for r in failures.read_failures(storage, "scrape")}
    for name in ODD:
        r = results[video_id(name)]
        if r["status"] == "done":
            assert r["chunks"] >= 1 and storage.exists(chunks_rel(video_id(name)))
            assert video_id(name) not in rows_failed
        else:
            assert rows_failed[video_id(name)]["reason"] == r["reason"], r
    for name in ("rate47999.wav", "rate384k.wav", "ch8_48k.wav"):  # full-band speech
        assert results[video_id(name)]["status"] == "done", results[video_id(name)]
    assert results[video_id("rate2401.wav")]["reason"] in ("", "no_speech")  # 1.2 kHz band
    assert results[video_id("rate1hz.wav")]["reason"] in ("no_speech", "too_short")


def test_downloads_stop_at_the_size_and_duration_caps(tmp_path):
    speech = sample_speech("podcast_en", 20)
    path = encode(tmp_path / "big.wav", speech.audio, 48000, "pcm_s16le", "wav")  # ~1.8 MB
    srv = serve({"big.wav": Route("file", path), "unsized.wav": Route("unsized", path)})
    try:
        small = make_cfg(tmp_path, "scrape.max_download_mb=1")
        for name in ("big.wav", "unsized.wav"):  # announced, then found on the way
            out = scrape_video(_rows(srv, [name])[0], small)
            assert (out["status"], out["reason"]) == ("failed", "too_large"), out
        short = make_cfg(tmp_path, "index.max_duration_s=10", "storage.root=" + str(tmp_path / "b"))
        out = scrape_video(_rows(srv, ["big.wav"])[0], short)
        assert (out["status"], out["reason"]) == ("failed", "too_long"), out
        row = failures.read_failures(Storage(short.storage.root), "scrape")[0]
        assert row["reason"] == "too_long" and row["attempts"] == 1
        assert scrape_video(_rows(srv, ["big.wav"])[0], make_cfg(tmp_path))["status"] == "done"
    finally:
        srv.close()


# -- the pieces ----------------------------------------------------------------------------------


def test_stream_resampler_equals_resampling_the_whole_signal():
    rng = np.random.default_rng(1)
    pairs = [(48000, 24000), (44100, 24000), (8000, 24000), (24000, 8000), (22050, 16000)]
    pairs += [(24000, 16000)]  # the server's VAD input
    odd = [(1, 24000), (7, 24000), (2401, 24000), (47999, 24000), (383999, 24000)]
    for a, b in pairs + odd:
        x = rng.standard_normal(a * 3 + 17).astype(np.float32)
        whole = resample(torch.from_numpy(x), a, b).numpy()
        assert abs(len(whole) - len(x) * b / a) <= 1, (a, b)
        rs, parts, i = StreamResampler(a, b), [], 0
        while i < len(x):
            n = int(rng.integers(1, max(2, a // 2)))
            parts.append(rs.push(x[i : i + n]))
            i += n
        parts.append(rs.flush())
        got = np.concatenate(parts)
        assert got.shape == whole.shape
        np.testing.assert_allclose(got, whole, atol=1e-4)


def test_awkward_rates_go_through_libswresample_in_time_and_level():
    """Past torchaudio's small kernels, libswresample (a fixed-size filter bank at any
    ratio; memory is checked on whole files in the capped scrape test below): a tone comes
    through at its level and in time."""
    from voxtral.audio import uses_torchaudio

    assert uses_torchaudio(48000, 24000) and uses_torchaudio(44100, 24000)
    assert uses_torchaudio(1, 24000)  # under ~30 Hz libswresample gives nothing: tiny kernel
    for a in (2401, 47999, 383999):
        assert not uses_torchaudio(a, SR)
        t = np.arange(a * 2) / a
        tone = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
        rs = StreamResampler(a, SR)
        out = np.concatenate([rs.push(tone[i : i + a // 3]) for i in range(0, len(tone), a // 3)])
        out = np.concatenate([out, rs.flush()])
        ref = 0.5 * np.sin(2 * np.pi * 300 * np.arange(len(out)) / SR)
        np.testing.assert_allclose(out[SR // 10 : -SR // 10], ref[SR // 10 : -SR // 10], atol=0.01)


def test_decode_stream_downmixes_by_averaging(tmp_path):
    t = np.arange(SR * 2) / SR
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = encode(tmp_path / "s.wav", tone, SR, "pcm_s16le", "wav", stereo=True)
    got = np.concatenate(list(decode_stream(str(path), SR, block_s=0.3)))
    np.testing.assert_allclose(got, tone * (0.9 + 0.5) / 2, atol=1e-3)


def test_decode_errors_are_typed(tmp_path):
    (tmp_path / "t.mp3").write_text("hello\n" * 100)
    with pytest.raises(NotAudioError):
        list(decode_stream(str(tmp_path / "t.mp3"), SR))
    (tmp_path / "g.m4a").write_bytes(bytes(range(256)) * 100)
    with pytest.raises(CorruptAudioError):
        list(decode_stream(str(tmp_path / "g.m4a"), SR))


def speech_pattern(seed: int, seconds: float) -> np.ndarray:
    """Per-frame probabilities: turns of 0.5–6 s separated by pauses of 0.1–2 s."""
    rng = np.random.default_rng(seed)
    out, n = [], int(seconds / FRAME_S)
    while sum(map(len, out)) < n:
        out.append(rng.uniform(0.7, 1.0, int(rng.uniform(0.5, 6) / FRAME_S)))
        out.append(rng.uniform(0.0, 0.2, int(rng.uniform(0.1, 2) / FRAME_S)))
    return np.concatenate(out)[:n].astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planner_cuts_in_pauses_within_bounds_and_streams_the_same(seed):
    probs = speech_pattern(seed, 400)
    lo, hi, pad = 313, 938, 8  # 10 s, 30 s, 0.25 s
    whole = ChunkPlanner(lo, hi, pad).finish(probs)
    planner, got, i = ChunkPlanner(lo, hi, pad), [], 0
    rng = np.random.default_rng(seed)
    while i < len(probs):
        n = int(rng.integers(1, 700))
        got += planner.push(probs[i : i + n])
        i += n
    got += planner.finish()
    assert got == whole and whole
    speech = hysteresis(probs, 0.5, 0.35)
    covered = np.zeros(len(probs), bool)
    for c in whole:
        assert lo <= c.frames <= hi
        covered[c.start : c.end] = True
        assert c.speech == speech[c.start : c.end].sum()
    for a, b in zip(whole, whole[1:], strict=False):
        assert a.end <= b.start
        assert not speech[a.end : b.start].any()  # only silence is left out
        assert not speech[a.end - 1] or a.frames == hi or not speech[a.end]  # cut in a pause
    tail = whole[-1].end
    assert covered[:tail][speech[:tail]].all()  # every speech frame up to the end is kept


def test_planner_without_pauses_cuts_at_max_and_silence_gives_nothing():
    chunks = ChunkPlanner(100, 200, 8).finish(np.full(1000, 0.9, np.float32))
    assert [c.frames for c in chunks] == [200] * 5
    assert ChunkPlanner(100, 200, 8).finish(np.zeros(5000, np.float32)) == []


def test_vtt_youtube_and_plain_cues():
    youtube = (
        "WEBVTT\nKind: captions\nLanguage: en\n\n"
        "00:00:00.160 --> 00:00:02.990 align:start position:0%\n \n"
        "so<00:00:00.640><c> today</c><00:00:01.120><c> we're</c>\n\n"
        "00:00:02.990 --> 00:00:03.000 align:start position:0%\nso today we're\n \n\n"
        "00:00:03.000 --> 00:00:05.000 align:start position:0%\nso today we're\n"
        "going<00:00:03.500><c> to</c><00:00:04.000><c> [Music] talk</c>\n"
    )
    words = parse_vtt(youtube)
    assert [w.word for w in words] == ["so", "today", "we're", "going", "to", "talk"]
    assert [w.start_s for w in words] == [0.16, 0.64, 1.12, 3.0, 3.5, 4.0]
    plain = "WEBVTT\n\n1\n00:01.000 --> 00:03.000\n<v Anna>Hello &amp; welcome\n"
    words = parse_vtt(plain)
    assert [w.word for w in words] == ["Hello", "&", "welcome"]
    assert words[0].start_s == 1.0 and words[-1].end_s == 3.0
    idx = CaptionIndex(words)
    assert [w["word"] for w in idx.within(1.5, 3.0)] == ["&", "welcome"]
    assert idx.within(1.5, 3.0)[0]["start_s"] >= 0
    assert parse_vtt("not a caption file") == []


def test_only_http_and_local_files_under_the_corpus_are_fetched(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.ogg").write_bytes(b"x")
    (tmp_path / "secret.ogg").write_bytes(b"x")
    check_url("https://www.youtube.com/watch?v=abcdefghijk", "youtube", None)
    check_url((corpus / "a.ogg").as_uri(), "local", corpus)
    bad = [
        ("file:///etc/passwd", "youtube", None),
        ("ftp://example.com/a.mp3", "youtube", None),
        ("javascript:alert(1)", "youtube", None),
        ((tmp_path / "secret.ogg").as_uri(), "local", corpus),
        (corpus.as_uri() + "/../secret.ogg", "local", corpus),
        ("https://example.com/a.mp3", "local", corpus),
    ]
    for url, source, root in bad:
        with pytest.raises(ScrapeFailure) as err:
            check_url(url, source, root)
        assert err.value.reason == "bad_url", url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/a.mp3",
        "http://localhost/a.mp3",
        "http://[::1]/a.mp3",
        "http://[::ffff:127.0.0.1]/a.mp3",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
        "http://10.1.2.3/a.mp3",
        "https://192.168.0.7/a.mp3",
        "http://[fe80::1]/a.mp3",
        "http://0.0.0.0/a.mp3",
        "http://224.0.0.1/a.mp3",
    ],
)
def test_private_and_link_local_hosts_are_refused_for_non_local_rows(url):
    with pytest.raises(ScrapeFailure, match="non-public address") as err:
        check_url(url, "youtube", None)
    assert err.value.reason == "bad_url"
    check_url(url, "youtube", None, allow_private=True)  # a trusted index (the tests' server)
    check_url("http://93.184.216.34/a.mp3", "youtube", None)  # a public address passes


def test_error_reasons_from_ytdlp_exceptions():
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import DownloadError, ExtractorError

    class Resp:
        status, reason, headers, url = 403, "Forbidden", {}, "http://x"

        def close(self):
            pass

    http = ExtractorError("Unable to download webpage", cause=HTTPError(Resp()))
    assert classify(DownloadError("ERROR: boom", exc_info=(type(http), http, None))) == "http_403"
    timeout = TransportError("Read timed out. (read timeout=1.0)")
    assert classify(DownloadError("ERROR: x", exc_info=(type(timeout), timeout, None))) == "timeout"
    assert classify(DownloadError("ERROR: 100 bytes read, 100 more expected")) == "truncated"
    assert classify(DownloadError("ERROR: Did not get any data blocks")) == "empty"
    assert classify(DownloadError("ERROR: [youtube] x: Private video")) == "unavailable"
    assert classify(RuntimeError("something else")) == "error"


def test_transient_and_rate_limited_errors():
    """What the index's search backs off on: "slow down" answers, timeouts, server errors;
    not a video that is gone, nor a 4xx that waiting does not change."""
    assert is_rate_limited(RuntimeError("HTTP Error 429: Too Many Requests"))
    assert is_rate_limited(RuntimeError("please slow down")) and is_transient(TimeoutError())
    assert not is_rate_limited(RuntimeError("HTTP Error 503"))
    for text in ("HTTP Error 503", "Read timed out", "Connection reset by peer", "quota"):
        assert is_transient(RuntimeError(text)), text
    for text in ("Private video", "HTTP Error 404: Not Found", "Unsupported URL"):
        assert not is_transient(RuntimeError(text)), text


def test_search_and_download_share_the_ytdlp_options(tmp_path):
    cfg = make_cfg(tmp_path, "scrape.proxy=http://proxy:3128")
    shared = base_ydl_params(cfg.scrape.timeout_s, cfg.scrape.proxy)
    assert shared["proxy"] == "http://proxy:3128" and shared["cachedir"] is False
    assert shared.items() <= ydl_params(cfg.scrape, str(tmp_path), False).items()
    assert "proxy" not in base_ydl_params(5.0)


def test_cut_audio_writes_nothing_visible_when_the_file_is_too_short(tmp_path):
    cfg = make_cfg(tmp_path)
    speech = sample_speech("podcast_en", 4)
    path = encode(tmp_path / "short.wav", speech.audio, SR, "pcm_s16le", "wav")
    with pytest.raises(ScrapeFailure) as err:
        cut_audio(str(path), "short", cfg, str(tmp_path / "out.parquet"))
    assert err.value.reason == "too_short"


# -- a node leaves in the middle of a scrape -----------------------------------------------------


NODE_DEATH_IN_2_S = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
"""Ray's health checks for the test's own cluster: its GCS declares the removed node dead
(and Ray Data reruns that node's tasks) within about 2 s, not Ray's default of about 10 s
spent waiting with nothing to do (the removal to the end of the stage: 14 s, then 3 s)."""


@pytest.mark.slow
def test_node_removed_mid_scrape_every_chunk_exactly_once(tmp_path, server, media):
    """Two nodes; the worker node is removed while its tasks run. Ray Data reruns them on the
    head node; each video's file is written atomically under its id, so the result holds
    every chunk exactly once, the same chunks a plain sequential loop makes."""
    names = ["mp3_44k_stereo.mp3", "opus48k_mono.ogg", "aac8k_mono.m4a"]
    rows = []
    for copy in range(2):
        for name in names:
            rows.append(
                {
                    "video_id": f"n{copy}-{video_id(name)}",
                    "url": server.url(name),
                    "title": name,
                    "channel": "",
                    "duration_s": media["speech"][name].seconds,
                    "search_term": "",
                    "source": "youtube",
                }
            )
    # the reference: the same functions in a plain loop, no Ray
    # speakers are not what this is about: diarisation off halves each video's work
    ref_cfg = make_cfg(tmp_path / "ref", "diarize.enabled=false")
    reference = {}
    for name in names:
        out = scrape_video({**rows[0], "video_id": "ref", "url": server.url(name)}, ref_cfg)
        assert out["status"] == "done"
        table = Storage(ref_cfg.storage.root).read_table(chunks_rel("ref"))
        reference[name] = [(r["start_s"], r["duration_s"]) for r in table.to_pylist()]
        Storage(ref_cfg.storage.root).delete(chunks_rel("ref"))

    cfg = make_cfg(
        tmp_path, "scrape.rate_limit=120K", "scrape.num_cpus=0.5", "diarize.enabled=false"
    )
    storage = Storage(cfg.storage.root)
    write_rows(storage, rows)
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); "
        "from _scrape_media import scrape_while_a_node_leaves; "
        "print(json.dumps(scrape_while_a_node_leaves(sys.argv[1])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, cfg.model_dump_json()],
        cwd=REPO_ROOT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **NODE_DEATH_IN_2_S},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["done_at_removal"] and result["done_at_removal"][0] < len(rows)  # mid-scrape
    table = storage.read_table("chunks")
    ids = table.column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert failures.read_failures(storage, "scrape") == []
    for r in rows:
        mine = table.filter(pa.compute.equal(table["video_id"], r["video_id"])).to_pylist()
        name = next(n for n in names if r["video_id"].endswith(video_id(n)))
        got = sorted((c["start_s"], c["duration_s"]) for c in mine)
        assert got == reference[name], r["video_id"]
        assert sorted(c["chunk_id"] for c in mine) == [
            f"{r['video_id']}-{i:05d}" for i in range(len(reference[name]))
        ]
