"""Preprocess: chunks → tokens on the sample corpus, through the real Ray Data plan."""

from __future__ import annotations

import importlib.util
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pytest
import soundfile as sf
import torch

from tests._speech import assert_same_codes
from tests.commands import ONE_STREAM_ENCODEC
from voxtral import failures, schema
from voxtral.audio import flac_encode
from voxtral.codec import (
    CodecInfo,
    CodecMismatchError,
    check_codec_compatible,
    codec_info,
    ensure_codec_record,
    load_codec,
    read_codec_record,
)
from voxtral.codec.batching import (
    as_pcm16,
    decode_chunk,
    encode_alone,
    encode_group,
    pad_batch,
    plan_batches,
)
from voxtral.config import DEFAULT_CONFIG, REPO_ROOT, Config, load_config
from voxtral.interleave import encode_ids
from voxtral.model import base_text_size, layout_for, load_text_tokenizer, resolve_base
from voxtral.schema import CODEC_RECORD, LEGACY_CODEC_RECORD, codes_from_bytes, codes_to_bytes
from voxtral.stages.index import run_index
from voxtral.stages.preprocess import (
    ChunkEncoder,
    decode_batch,
    fit_actor_cpus,
    run_preprocess,
    write_batch,
)
from voxtral.stages.scrape import run_scrape
from voxtral.storage import Storage

CORRUPT_ID = "corrupt-chunk"
WORDS = "so what do you think about that well we talked about this last week".split()


# -- corpus ------------------------------------------------------------------------------
def speech_like(seconds: float, sr: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Syllables of a harmonic voice with gliding pitch, separated by short gaps and pauses,
    and caption words timed on groups of syllables."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * sr), np.float32)
    words, t = [], 0.1
    while t < seconds - 0.4:
        start = t
        for _ in range(int(rng.integers(1, 4))):
            dur = float(rng.uniform(0.08, 0.25))
            n = int(dur * sr)
            a = int(t * sr)
            if a + n > out.size:
                break
            tt = np.arange(n) / sr
            f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * tt))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formant = rng.uniform(300, 900)
            voice = sum(
                np.sin(k * phase) * np.exp(-(((k * f0) - formant) ** 2) / 2e5) for k in range(1, 12)
            )
            env = np.sin(np.pi * np.arange(n) / n) ** 2
            out[a : a + n] += (0.3 * voice * env + rng.normal(0, 0.01, n)).astype(np.float32)
            t += dur + float(rng.uniform(0.02, 0.06))
        words.append({"word": str(rng.choice(WORDS)), "start_s": start, "end_s": t})
        t += float(rng.uniform(0.05, 0.3)) + (0.6 if rng.random() < 0.1 else 0.0)
    return np.clip(out, -1, 1), words


def chunk_row(chunk_id: str, video_id: str, wav: np.ndarray, sr: int, captions, start_s=0.0):
    return {
        "chunk_id": chunk_id,
        "video_id": video_id,
        "start_s": start_s,
        "duration_s": len(wav) / sr,
        "sample_rate": sr,
        "audio": flac_encode(wav, sr),
        "speech_ratio": 0.8,
        "captions": captions,
    }


def scrape_sample(cfg: Config, request: pytest.FixtureRequest) -> None:
    """The real index + scrape stages on the bundled sample: this stage's input.

    Where this session runs ``jobs/everything.py`` anyway (conftest's ``everything_run``,
    the slow tests), its ``index/`` and ``chunks/`` are copied instead: the same two stages
    on the same config (checked), so the same rows, scraped once per session."""
    storage = Storage(cfg.storage.root)
    if not copy_everything_scrape(cfg, request):
        run_index(cfg)
        run_scrape(cfg)
    reasons = {f"{r['reason']}: {r['error']}" for r in failures.read_failures(storage, "scrape")}
    assert storage.parquet_files("chunks"), f"the scrape gave no chunks: {sorted(reasons)}"


def copy_everything_scrape(cfg: Config, request: pytest.FixtureRequest) -> bool:
    """Copy the everything run's index and scrape output to ``cfg``'s root, if the session
    runs it and its config differs from ``cfg`` in nothing but the storage root, the
    training keys and the token layout (scrape depends on the codec only through its sample
    rate); whether it did."""
    from tests.commands import EVERYTHING_FAST, user_env

    if not any("everything_run" in getattr(i, "fixturenames", ()) for i in request.session.items):
        return False
    root, _log, summaries = request.getfixturevalue("everything_run")
    theirs = load_config(DEFAULT_CONFIG, [f"storage.root={root}", *EVERYTHING_FAST], env=user_env())
    same = {
        "storage": cfg.storage,
        "train": cfg.train,
        "codec": cfg.codec,
        "tokenizer": cfg.tokenizer,
    }
    if theirs.model_copy(update=same) != cfg:
        return False
    if codec_info(theirs.codec).sample_rate != codec_info(cfg.codec).sample_rate:
        return False
    if summaries["scrape"]["failed"] or failures.read_failures(Storage(root), "scrape"):
        return False
    for folder in ("index", "chunks"):
        shutil.copytree(root / folder, Path(cfg.storage.root) / folder)
    return True


def add_corrupt_row(storage: Storage) -> None:
    """A truncated FLAC appended to the first video's chunk file."""
    path = storage.parquet_files("chunks")[0]
    rel = path[len(storage.base) + 1 :]
    table = storage.read_table(rel)
    good = table.to_pylist()[0]
    bad = {**good, "chunk_id": CORRUPT_ID, "audio": good["audio"][: len(good["audio"]) // 3]}
    bad["audio"] = bad["audio"][:40] + b"\x00" * 64 + bad["audio"][104:]
    storage.write_table(rel, pa.Table.from_pylist([*table.to_pylist(), bad], schema=schema.CHUNKS))


def chunk_table(storage: Storage) -> pa.Table:
    return storage.read_table("chunks")


def by_chunk(storage: Storage, column: str) -> dict:
    """chunk_id → one column of the chunks rows."""
    table = chunk_table(storage)
    return dict(zip(table["chunk_id"].to_pylist(), table[column].to_pylist(), strict=True))


def token_rows(storage: Storage) -> list[dict]:
    table = storage.read_table("tokens")
    return [] if table is None else table.to_pylist()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Config:
    root = tmp_path_factory.mktemp("preprocess") / "run"
    return load_config(DEFAULT_CONFIG, [f"storage.root={root}", *ONE_STREAM_ENCODEC], env={})


@pytest.fixture(scope="module")
def corpus(cfg, ray_session, request) -> dict:
    storage = Storage(cfg.storage.root)
    scrape_sample(cfg, request)
    add_corrupt_row(storage)
    summary = run_preprocess(cfg)
    return {"storage": storage, "summary": summary}


@pytest.fixture(scope="module")
def codec(cfg):
    return load_codec(cfg.codec)


@pytest.fixture
def one_thread():
    """Reference encodings with one torch thread, as the 1-CPU workers run: the thread
    count changes float rounding, which is not what these tests are about."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_tokenizer(cfg):
    return load_text_tokenizer(resolve_base(cfg.model))


# -- the stage on the corpus ---------------------------------------------------------------
def test_every_chunk_has_one_token_row(corpus):
    storage, summary = corpus["storage"], corpus["summary"]
    chunks = chunk_table(storage)
    good = sorted(set(chunks["chunk_id"].to_pylist()) - {CORRUPT_ID})
    rows = token_rows(storage)
    assert sorted(r["chunk_id"] for r in rows) == good
    assert summary["chunks"] == len(good) and summary["failures"] == 1
    assert summary["failures_by_reason"] == {"corrupt_flac": 1}
    seconds = sum(chunks["duration_s"].to_pylist()[i] for i in range(len(chunks)))
    assert summary["audio_hours"] == pytest.approx(
        (
            seconds
            - chunks.filter(pa.compute.equal(chunks["chunk_id"], CORRUPT_ID))["duration_s"][
                0
            ].as_py()
        )
        / 3600,
        rel=1e-3,
    )
    assert summary["xrt"] > 0
    video_of = dict(
        zip(chunks["chunk_id"].to_pylist(), chunks["video_id"].to_pylist(), strict=True)
    )
    assert all(r["video_id"] == video_of[r["chunk_id"]] for r in rows)


def test_codes_shapes_frames_and_codebook_range(corpus, cfg):
    storage = corpus["storage"]
    info = codec_info(cfg.codec)
    durations = dict(
        zip(*(chunk_table(storage)[k].to_pylist() for k in ("chunk_id", "duration_s")), strict=True)
    )
    for r in token_rows(storage):
        assert (r["codec"], r["n_q"]) == (info.name, info.n_q)
        samples = round(durations[r["chunk_id"]] * info.sample_rate)
        assert r["frames"] == math.ceil(samples / info.hop)
        assert r["frames"] == math.ceil(durations[r["chunk_id"]] * info.frame_rate - 1e-6)
        assert len(r["codes"]) == 2 * info.n_q * r["frames"]
        codes = codes_from_bytes(r["codes"], r["n_q"], r["frames"])
        assert codes.min() >= 0 and codes.max() < info.codebook_size
        assert len(np.unique(codes[0])) > 1  # real codes, not a constant


def reference_encoders(codec_cfg, n: int) -> list:
    """``n`` Ray actors of one CPU that encode a chunk alone, one torch thread each, as the
    stage's codec actors run: the references of the test below, computed side by side."""
    import ray

    @ray.remote(num_cpus=1)
    class ReferenceEncoder:
        def __init__(self, codec_cfg):
            torch.set_num_threads(1)
            self.codec = load_codec(codec_cfg)

        def encode(self, audio: bytes, raw: bool) -> tuple[np.ndarray, np.ndarray | None]:
            """The chunk encoded alone, and (``raw``) the codec called on the raw chunk."""
            wav = decode_chunk(audio, self.codec.sample_rate)
            alone = encode_alone(self.codec, wav)
            if not raw:
                return alone, None
            return alone, self.codec.encode(torch.from_numpy(wav)[None, None])[0].numpy()

    return [ReferenceEncoder.remote(codec_cfg) for _ in range(n)]


def test_batched_codes_equal_encoding_each_chunk_alone(corpus, cfg, codec, one_thread):
    import ray

    storage = corpus["storage"]
    audio = by_chunk(storage, "audio")
    hop = codec.info.hop
    rows = token_rows(storage)
    # Every chunk's references (the raw call for the first three), the costliest first,
    # each to the worker with the least work so far: the two finish together.
    encoders, work = reference_encoders(cfg.codec, 2), [0, 0]
    pending = {}
    for i in sorted(range(len(rows)), key=lambda i: -rows[i]["frames"] * (1 + (i < 3))):
        k = work.index(min(work))
        work[k] += rows[i]["frames"] * (1 + (i < 3))
        pending[i] = encoders[k].encode.remote(audio[rows[i]["chunk_id"]], i < 3)
    try:
        references = {i: ray.get(ref) for i, ref in pending.items()}
    finally:
        for encoder in encoders:
            ray.kill(encoder)
    for i, r in enumerate(rows):
        wav = decode_chunk(audio[r["chunk_id"]], codec.sample_rate)
        stored = codes_from_bytes(r["codes"], r["n_q"], r["frames"])
        alone, raw = references[i]
        assert_same_codes(codec, wav, stored, alone, r["chunk_id"])
        if i >= 3:
            continue
        # The codec called on the raw chunk agrees on every whole frame (its own padding of
        # a partial last frame is the one difference, see voxtral.stages.preprocess).
        whole = len(wav) // hop
        assert_same_codes(codec, wav, stored[:, :whole], raw[:, :whole], r["chunk_id"] + " raw")


def test_text_ids_in_base_vocab_and_time_ordered(corpus, cfg, text_tokenizer):
    storage = corpus["storage"]
    vocab = base_text_size(resolve_base(cfg.model))
    captions = by_chunk(storage, "captions")
    turns = by_chunk(storage, "turns")
    with_text = 0
    for r in token_rows(storage):
        ids, starts = r["text_ids"], r["text_starts_s"]
        assert len(ids) == len(starts)
        # text.source=auto: the caption words where the chunk has them, else Whisper's
        words = r["words"]
        if captions[r["chunk_id"]]:
            assert r["text_source"] == "captions" and r["language"] is None
            assert [w["word"] for w in words] == [
                w["word"] for w in sorted(captions[r["chunk_id"]], key=lambda w: w["start_s"])
            ]
        else:
            assert r["text_source"] in ("asr", "none") and r["language"]
        # the sample dialogues are diarised: words get the speakers of the chunk's turns
        if turns[r["chunk_id"]] and words:
            named = [w["speaker"] for w in words if w["speaker"] is not None]
            assert len(named) >= 0.9 * len(words), words
            assert set(named) <= {t["speaker"] for t in turns[r["chunk_id"]]}, words
        if not words:
            assert ids == [] and r["text_source"] == "none"
            continue
        with_text += 1
        assert all(0 <= i < vocab for i in ids)
        assert starts == sorted(starts)
        assert starts[0] >= 0 and starts[-1] <= max(w["end_s"] for w in words) + 1e-3
        spoken = " ".join(w["word"] for w in sorted(words, key=lambda w: w["start_s"]))
        # the ids spell the words (decoding may tidy spaces around punctuation)
        assert "".join(text_tokenizer.decode(ids).split()) == "".join(spoken.split())
    assert with_text > 0


def test_corrupt_row_lands_in_failures(corpus):
    rows = failures.read_failures(corpus["storage"], "preprocess")
    assert [(r["item_id"], r["stage"], r["reason"]) for r in rows] == [
        (CORRUPT_ID, "preprocess", "corrupt_flac")
    ]
    assert "FLAC" in rows[0]["error"]


STAGE_FOLDERS = ("index", "chunks", "tokens", "failures")


def test_every_stage_folder_opens_as_a_parquet_dataset(corpus):
    """Side files (the codec record) carry the ``_`` prefix dataset readers skip, so each
    output folder opens whole in pyarrow, pandas and Ray Data, with every row once."""
    import pandas as pd
    import ray

    storage = corpus["storage"]
    chunk_ids = set(chunk_table(storage)["chunk_id"].to_pylist())
    failed = sum(len(failures.read_failures(storage, s)) for s in storage.listdir("failures"))
    want = {
        "index": storage.read_table("index").num_rows,
        "chunks": len(chunk_ids),
        "tokens": len(chunk_ids - {CORRUPT_ID}),
        "failures": failed,
    }
    assert want["tokens"] > 0 and want["failures"] >= 1  # the corrupt chunk
    assert storage.exists(CODEC_RECORD) and not storage.exists(LEGACY_CODEC_RECORD)
    for folder in STAGE_FOLDERS:
        ds = pds.dataset(storage.path(folder), format="parquet")
        assert ds.count_rows() == want[folder], folder
        files = storage.fs.get_file_info(pafs.FileSelector(storage.path(folder), recursive=True))
        side = [
            f for f in files if f.type == pafs.FileType.File and not f.path.endswith(".parquet")
        ]
        assert all(f.base_name[0] in "_." for f in side), (folder, [f.path for f in side])
    assert len(pd.read_parquet(storage.path("tokens"))) == want["tokens"]
    assert ray.data.read_parquet(storage.path("tokens")).count() == want["tokens"]


def test_tokens_fit_the_multimodal_layout(corpus, cfg):
    layout = layout_for(cfg)
    check_codec_compatible(corpus["storage"], CodecInfo.from_layout(layout))
    r = token_rows(corpus["storage"])[0]
    ids = encode_ids(
        layout,
        codes_from_bytes(r["codes"], r["n_q"], r["frames"]),
        np.asarray(r["text_ids"]),
        np.asarray(r["text_starts_s"]),
    )
    assert len(ids) == 1 + (r["frames"] // layout.frames_per_group) * layout.group_len


def test_rerun_adds_nothing(corpus, cfg, capsys):
    storage = corpus["storage"]
    before_files = storage.listdir("tokens")
    before = token_rows(storage)
    spec = importlib.util.spec_from_file_location(
        "job_preprocess", REPO_ROOT / "jobs/preprocess.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    sets = [f"storage.root={cfg.storage.root}", *ONE_STREAM_ENCODEC]
    summary = job.main(["--config", str(DEFAULT_CONFIG), *(a for s in sets for a in ("--set", s))])
    assert "preprocess summary" in capsys.readouterr().out
    assert summary["chunks"] == 0 and summary["already_done"] == len(before)
    assert storage.listdir("tokens") == before_files
    assert token_rows(storage) == before
    # the corrupt chunk is not retried: its bytes cannot decode any better
    assert summary["failures"] == 0 and summary["skipped_failed"] == 1
    assert [
        (r["item_id"], r["attempts"]) for r in failures.read_failures(storage, "preprocess")
    ] == [(CORRUPT_ID, 1)]


def test_rerun_of_a_run_with_the_legacy_codec_json(corpus, cfg):
    """A root from before the rename (``tokens/codec.json``) reruns as it did, and the rerun
    moves the record to ``tokens/_codec.json``."""
    storage = corpus["storage"]
    record = read_codec_record(storage)
    storage.write_json(LEGACY_CODEC_RECORD, record.to_dict())
    storage.delete(CODEC_RECORD)
    assert check_codec_compatible(storage, codec_info(cfg.codec)) == record
    summary = run_preprocess(cfg)
    assert summary["chunks"] == 0 and summary["already_done"] == len(token_rows(storage))
    assert storage.read_json(CODEC_RECORD) == record.to_dict()
    assert not storage.exists(LEGACY_CODEC_RECORD)


def test_mismatched_codec_is_refused(corpus, cfg):
    storage = corpus["storage"]
    record = check_codec_compatible(storage, codec_info(cfg.codec))
    assert record == codec_info(cfg.codec)
    mimi = cfg.codec.model_copy(update={"name": "mimi"})
    with pytest.raises(CodecMismatchError, match="encodec.*mimi"):
        check_codec_compatible(storage, codec_info(mimi))
    mimi_tokenizer = cfg.tokenizer.model_copy(update={"group_ms": 80.0})
    other_layout = layout_for(cfg.model_copy(update={"codec": mimi, "tokenizer": mimi_tokenizer}))
    with pytest.raises(CodecMismatchError, match="n_q"):
        check_codec_compatible(storage, CodecInfo.from_layout(other_layout))
    with pytest.raises(CodecMismatchError, match="weights"):
        check_codec_compatible(
            storage, codec_info(cfg.codec.model_copy(update={"pretrained": True}))
        )
    # preprocess itself refuses to add mimi tokens to encodec ones, before any work
    with pytest.raises(CodecMismatchError):
        run_preprocess(cfg.model_copy(update={"codec": mimi}))
    with pytest.raises(FileNotFoundError, match="run preprocess first"):
        check_codec_compatible(Storage(storage.base + "-empty"), codec_info(cfg.codec))


def test_legacy_codec_json_is_read(tmp_path, cfg):
    storage = Storage(tmp_path / "old-run")
    assert read_codec_record(storage) is None
    legacy = codec_info(cfg.codec).to_dict()
    storage.write_json(LEGACY_CODEC_RECORD, legacy)
    assert read_codec_record(storage) == codec_info(cfg.codec)
    assert check_codec_compatible(storage, codec_info(cfg.codec)) == codec_info(cfg.codec)
    mimi = cfg.codec.model_copy(update={"name": "mimi"})
    with pytest.raises(CodecMismatchError, match="encodec.*mimi"):
        check_codec_compatible(storage, codec_info(mimi))
    # a refused run leaves the old record where it was
    with pytest.raises(CodecMismatchError):
        ensure_codec_record(storage, mimi)
    assert storage.exists(LEGACY_CODEC_RECORD) and not storage.exists(CODEC_RECORD)
    # the new name wins over the old one
    storage.write_json(CODEC_RECORD, {**legacy, "n_q": legacy["n_q"] * 2})
    assert read_codec_record(storage).n_q == legacy["n_q"] * 2
    with pytest.raises(CodecMismatchError, match="n_q"):
        check_codec_compatible(storage, codec_info(cfg.codec))


# -- mimi --------------------------------------------------------------------------------
def test_mimi_tokens(tmp_path, one_thread):
    """The stage's steps (decode → codec actor → writer) with Mimi, in-process: the Ray plan
    around them is codec-agnostic and tested above."""
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            f"storage.root={tmp_path / 'run'}",
            *ONE_STREAM_ENCODEC,
            "codec.name=mimi",
            "codec.n_q=8",
            "tokenizer.group_ms=80",
            "preprocess.batch_size=4",
        ],
        env={},
    )
    storage = Storage(cfg.storage.root)
    assert ensure_codec_record(storage, cfg.codec).name == "mimi"
    rows = []
    for c, seconds in enumerate((2.3, 3.1, 1.7)):
        wav, words = speech_like(seconds, 24_000, seed=c)
        rows.append(chunk_row(f"m-c{c}", "m", wav, 24_000, words))
    info = codec_info(cfg.codec)
    packed = decode_batch(
        pa.Table.from_pylist(rows, schema=schema.CHUNKS),
        sample_rate=info.sample_rate,
        hop=info.hop,
        batch_size=4,
        max_pad=0.5,
    )
    assert len(packed) == 1  # one codec batch of three lengths
    encoder = ChunkEncoder(cfg.codec, cfg.preprocess)
    stats = write_batch(
        encoder(packed), root=cfg.storage.root, base="tiny", failed_before=frozenset()
    )
    assert stats["reason"].null_count == 3
    by_id = {r["chunk_id"]: r for r in rows}
    tokens = token_rows(storage)
    assert sorted(r["chunk_id"] for r in tokens) == sorted(by_id)
    for r in tokens:
        assert (r["codec"], r["n_q"]) == ("mimi", 8) and r["text_ids"]
        wav = decode_chunk(by_id[r["chunk_id"]]["audio"], 24_000)
        assert r["frames"] == math.ceil(len(wav) / 1920)
        stored = codes_from_bytes(r["codes"], 8, r["frames"])
        assert stored.min() >= 0 and stored.max() < 2048
        alone = encode_alone(encoder.codec, wav)
        # Mimi's transformer rounds differently over a padded batch: codebook 0 matches,
        # deeper (random-init, near-tie) codebooks mostly do (see voxtral.stages.preprocess).
        np.testing.assert_array_equal(stored[0], alone[0])
        assert (stored == alone).mean() > 0.8


# -- pure functions ------------------------------------------------------------------------
def test_plan_batches_bounds_size_and_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10_000, 700_000, size=200).tolist()
    groups = plan_batches(lengths, max_batch=8, max_pad=0.2)
    assert sorted(i for g in groups for i in g) == list(range(200))
    for g in groups:
        assert len(g) <= 8
        longest = max(lengths[i] for i in g)
        assert lengths[g[0]] == longest
        assert 1 - sum(lengths[i] for i in g) / (len(g) * longest) <= 0.2 + 1e-9
    assert len(groups) < 60  # sorted grouping packs most groups full
    assert plan_batches([5, 5, 5], max_batch=2, max_pad=0.0) == [[0, 1], [2]]
    assert plan_batches([], 4, 0.1) == []


class FlakyCodec:
    """A codec that rejects any batch holding a chunk of exactly ``bad_len`` samples."""

    def __init__(self, bad_len: int):
        self.info = CodecInfo("fake", 2, 16, 8000, 100.0)
        self.bad_len, self.device = bad_len, torch.device("cpu")

    def encode(self, wav):
        nonzero = (wav[:, 0] != 0).int()
        lengths = wav.shape[-1] - nonzero.flip(-1).argmax(-1)
        if (lengths == self.bad_len).any():
            raise RuntimeError("codec rejects this chunk")
        frames = wav.shape[-1] // self.info.hop
        return torch.arange(frames).remainder(16).repeat(wav.shape[0], 2, 1)


def test_codec_rejection_isolates_the_chunk():
    codec = FlakyCodec(bad_len=805)
    lengths = [800, 805, 400, 790]
    pcm = pad_batch([np.ones(n, np.float32) for n in lengths], codec.info.hop)
    out = encode_group(codec, pcm, lengths)
    assert isinstance(out[1], RuntimeError)
    assert [o.shape for i, o in enumerate(out) if i != 1] == [(2, 10), (2, 5), (2, 10)]
    assert all(o.dtype == np.int16 for i, o in enumerate(out) if i != 1)


def test_decode_batch_packs_similar_lengths_and_sets_bad_rows_apart():
    sr, hop = 24_000, 320
    rows = [
        chunk_row("short", "v", speech_like(1.0, sr, 1)[0], sr, None),
        chunk_row("long", "v", speech_like(2.0, sr, 2)[0], sr, [{"word": "hi", "start_s": 0.2}]),
        chunk_row("long2", "v", speech_like(1.9, sr, 4)[0], sr, None),
        chunk_row("empty", "v", np.zeros(0, np.float32), sr, None),
        chunk_row("skip-me", "v", speech_like(1.0, sr, 3)[0], sr, None),
        {**chunk_row("junk", "v", np.zeros(10, np.float32), sr, None), "audio": b"not flac"},
    ]
    out = decode_batch(
        pa.Table.from_pylist(rows, schema=schema.CHUNKS),
        sample_rate=sr,
        hop=hop,
        batch_size=2,
        max_pad=0.2,
        skip=frozenset({"skip-me"}),
    ).to_pylist()
    assert [r["chunk_id"] for r in out] == [["long", "long2"], ["short"], ["empty", "junk"]]
    assert out[2]["reason"][0] in ("bad_audio", "corrupt_flac")  # a FLAC of no samples
    assert out[2]["reason"][1] == "corrupt_flac" and out[2]["width"] == 0
    first = out[0]
    assert first["dtype"] == "<i2" and first["reason"] == [None, None]
    assert first["width"] == math.ceil(first["samples"][0] / hop) * hop
    pcm = np.frombuffer(first["pcm"], "<i2").reshape(2, first["width"])
    wav = decode_chunk(rows[2]["audio"], sr)
    np.testing.assert_array_equal(pcm[1, : len(wav)] / np.float32(32768), wav)
    assert not pcm[1, len(wav) :].any()
    assert [w["word"] for w in first["captions"][0]] == ["hi"]


def test_pcm16_transport_is_exact_and_resampled_audio_stays_float():
    x = (np.arange(-5, 5, dtype=np.float32) * 1000) / 32768
    assert np.array_equal(as_pcm16(x).astype(np.float32) / 32768, x)
    assert as_pcm16(x + np.float32(1e-7)) is None
    buf = io.BytesIO()
    sf.write(buf, speech_like(1.0, 16_000, 0)[0], 16_000, format="FLAC", subtype="PCM_16")
    wav = decode_chunk(buf.getvalue(), 24_000)
    assert len(wav) == 24_000 and as_pcm16(wav) is None


def test_codes_bytes_roundtrip():
    codes = np.random.default_rng(0).integers(0, 2048, size=(8, 37)).astype(np.int64)
    data = codes_to_bytes(codes)
    assert len(data) == 8 * 37 * 2
    np.testing.assert_array_equal(codes_from_bytes(data, 8, 37), codes)
    with pytest.raises(ValueError):
        codes_from_bytes(data, 8, 36)


# -- the plan on a small cluster ------------------------------------------------------------
def test_actor_pools_leave_a_cpu_for_the_tasks_on_a_small_machine():
    """On 2 CPUs a 1-CPU codec actor and a 1-CPU Whisper actor would hold both and the read
    task would wait forever (the README's command hung so): the pools shrink to fit."""
    pools = {"codec": (1.0, 1), "text": (1.0, 1)}
    assert fit_actor_cpus(2, pools) == {"codec": 0.5, "text": 0.5}
    assert fit_actor_cpus(3, pools) == {"codec": 1.0, "text": 1.0}  # fits as configured
    assert fit_actor_cpus(0, pools) == {"codec": 1.0, "text": 1.0}  # an autoscaler adds CPUs
    shrunk = fit_actor_cpus(4, {"codec": (2.0, 2), "text": (1.0, 1)})
    assert 2 * shrunk["codec"] + shrunk["text"] == pytest.approx(3)
    assert shrunk["codec"] == pytest.approx(2 * shrunk["text"])  # the ratio is kept
    with pytest.raises(ValueError, match="needs more than 1"):
        fit_actor_cpus(1, pools)
