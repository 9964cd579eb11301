"""Preprocess with ``tokenizer.streams: 2``: the stage's per-batch functions in this process
(decode → ASR → codec → write, as the Ray plan chains them), on chunks with known turns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.test_preprocess import speech_like
from voxtral import failures, schema
from voxtral.asr import Transcript
from voxtral.audio import flac_encode
from voxtral.codec import codec_info, load_codec
from voxtral.codec.batching import decode_chunk, encode_alone
from voxtral.config import DEFAULT_CONFIG, ConfigError, load_config
from voxtral.schema import codes_from_bytes
from voxtral.stages import preprocess
from voxtral.stages.preprocess.duplex import NO_SPEAKERS, decode_channels
from voxtral.storage import Storage
from voxtral.tracks import split_tracks

SR = 24_000


def turn(a: float, b: float, who: str) -> dict:
    return {"start_s": a, "end_s": b, "speaker": who, "overlap": False}


def word(text: str, a: float, b: float, who: str | None) -> dict:
    return {"word": text, "start_s": a, "end_s": b, "speaker": who}


def row(chunk_id: str, wav: np.ndarray, captions, turns, channels=1, diarization="embeddings"):
    n = wav.shape[-1]
    return {
        "chunk_id": chunk_id,
        "video_id": "v",
        "start_s": 0.0,
        "duration_s": n / SR,
        "sample_rate": SR,
        "audio": flac_encode(wav, SR),
        "speech_ratio": 0.8,
        "captions": captions,
        "channels": channels,
        "turns": turns,
        "diarization": diarization,
    }


def voices(seconds: float, seed: int) -> np.ndarray:
    return speech_like(seconds, SR, seed)[0]


def dialog_rows() -> list[dict]:
    """A mono dialogue (S0 then S1), a stereo chunk split by channel (S0 on channel 1: the
    names follow the video, not the channels), a monologue and a chunk without turns."""
    a, b = voices(2.0, 1), voices(2.0, 2)
    mono = np.concatenate([a, b])
    words = [
        word("hello", 0.2, 0.6, "S0"),
        word("there", 0.8, 1.2, None),  # no speaker yet: the turns give it S0
        word("well", 2.3, 2.7, "S1"),
        word("yes", 3.0, 3.4, None),
    ]
    left = np.concatenate([np.zeros(int(1.5 * SR), np.float32), voices(1.5, 3)])
    right = np.concatenate([voices(1.5, 4), np.zeros(int(1.5 * SR), np.float32)])
    stereo = np.stack([left, right])  # [2, n]: S0 speaks first, on channel 1
    stereo_words = [word("one", 0.2, 0.5, "S0"), word("two", 1.8, 2.2, "S1")]
    return [
        row("dialog", mono, words, [turn(0.0, 2.0, "S0"), turn(2.0, 4.0, "S1")]),
        row(
            "stereo",
            stereo,
            stereo_words,
            [turn(0.0, 1.5, "S0"), turn(1.5, 3.0, "S1")],
            channels=2,
            diarization="channels",
        ),
        row("solo", voices(2.5, 5), [word("alone", 0.3, 0.8, None)], [turn(0.1, 2.4, "S2")]),
        row("no-turns", voices(2.0, 6), [word("who", 0.3, 0.8, None)], None, diarization="off"),
    ]


class RecordingWhisper:
    """Stands in for Whisper: records what it is given, hears one word per second."""

    def __init__(self):
        self.calls: list[list[np.ndarray]] = []

    def transcribe_each(self, waveforms, sample_rate):
        assert sample_rate == SR
        self.calls.append([np.array(w) for w in waveforms])
        return [
            Transcript([word(f"w{i}", i + 0.2, i + 0.5, None) for i in range(int(len(w) / SR))])
            for w in waveforms
        ]


def run_stage(cfg, storage: Storage, transcriber) -> pa.Table:
    """decode → ASR → codec → write in this process, as ``tests/test_asr.run_in_process``."""
    info = codec_info(cfg.codec)
    packed = preprocess.decode_batch(
        storage.read_table("chunks"),
        sample_rate=info.sample_rate,
        hop=info.hop,
        batch_size=cfg.preprocess.batch_size,
        max_pad=cfg.preprocess.max_pad,
        streams=cfg.tokenizer.streams,
    )
    rows = [
        preprocess.transcribe_row(transcriber, meta, pcm.as_py(), info.sample_rate, cfg.text.source)
        for meta, pcm in zip(packed.drop_columns(["pcm"]).to_pylist(), packed["pcm"], strict=True)
    ]
    encoder = preprocess.ChunkEncoder(cfg.codec, cfg.preprocess)
    encoded = encoder(preprocess.with_pcm(rows, packed["pcm"]))
    return preprocess.write_batch(
        encoded, root=storage.root_uri, base=cfg.model.base, failed_before=frozenset()
    )


def stage(tmp_path, source: str, streams: int) -> dict:
    root = tmp_path / f"{source}-{streams}"
    cfg = load_config(
        DEFAULT_CONFIG,
        [f"storage.root={root}", f"text.source={source}", f"tokenizer.streams={streams}"],
        env={},
    )
    storage = Storage(str(root))
    chunks = dialog_rows()
    storage.write_table("chunks/v.parquet", pa.Table.from_pylist(chunks, schema=schema.CHUNKS))
    whisper = RecordingWhisper()
    stats = run_stage(cfg, storage, whisper)
    tokens = storage.read_table("tokens").to_pylist()
    return {
        "cfg": cfg,
        "storage": storage,
        "chunks": {c["chunk_id"]: c for c in chunks},
        "stats": stats.to_pylist(),
        "tokens": tokens,
        "whisper": whisper,
    }


@pytest.fixture(scope="module")
def captions_run(tmp_path_factory, one_thread) -> dict:
    return stage(tmp_path_factory.mktemp("duplex"), "captions", 2)


@pytest.fixture(scope="module")
def codec(captions_run):
    return load_codec(captions_run["cfg"].codec)


def rows_of(run: dict, chunk_id: str) -> dict[str, dict]:
    return {r["model_speaker"]: r for r in run["tokens"] if r["chunk_id"] == chunk_id}


def test_one_row_per_main_speaker_with_both_streams(captions_run):
    run = captions_run
    assert {c: len(rows_of(run, c)) for c in ("dialog", "stereo", "solo", "no-turns")} == {
        "dialog": 2,
        "stereo": 2,
        "solo": 1,
        "no-turns": 0,
    }
    assert set(rows_of(run, "dialog")) == {"S0", "S1"} and set(rows_of(run, "solo")) == {"S2"}
    info = codec_info(run["cfg"].codec)
    for r in run["tokens"]:
        model = codes_from_bytes(r["codes"], r["n_q"], r["frames"])
        user = codes_from_bytes(r["user_codes"], r["n_q"], r["frames"])
        seconds = run["chunks"][r["chunk_id"]]["duration_s"]
        assert model.shape == user.shape == (info.n_q, r["frames"])
        assert r["frames"] == info.frames(round(seconds * info.sample_rate))
        assert 0 <= model.min() and max(model.max(), user.max()) < info.codebook_size
    # the summary: one row per chunk, however many examples it gave
    assert sorted(s["chunk_id"] for s in run["stats"]) == ["dialog", "no-turns", "solo", "stereo"]


def test_words_are_the_model_speakers_only(captions_run):
    dialog = rows_of(captions_run, "dialog")
    assert [w["word"] for w in dialog["S0"]["words"]] == ["hello", "there"]
    assert [w["word"] for w in dialog["S1"]["words"]] == ["well", "yes"]
    stereo = rows_of(captions_run, "stereo")
    assert [w["word"] for w in stereo["S0"]["words"]] == ["one"]
    assert [w["word"] for w in stereo["S1"]["words"]] == ["two"]
    for r in captions_run["tokens"]:
        assert {w["speaker"] for w in r["words"]} <= {r["model_speaker"]}
        assert len(r["text_starts_s"]) == len(r["text_ids"]) > 0
        assert r["text_source"] == "captions"


def test_mono_tracks_are_the_mix_split_by_turns(captions_run, codec):
    chunk = captions_run["chunks"]["dialog"]
    mix = decode_chunk(chunk["audio"], SR)
    for who, r in rows_of(captions_run, "dialog").items():
        model, user = split_tracks(mix, SR, chunk["turns"], who, channels=1)
        np.testing.assert_array_equal(
            codes_from_bytes(r["codes"], r["n_q"], r["frames"]), encode_alone(codec, model)
        )
        np.testing.assert_array_equal(
            codes_from_bytes(r["user_codes"], r["n_q"], r["frames"]), encode_alone(codec, user)
        )
    s0, s1 = rows_of(captions_run, "dialog")["S0"], rows_of(captions_run, "dialog")["S1"]
    assert s0["codes"] != s1["codes"]


def test_stereo_tracks_are_its_channels(captions_run, codec):
    chunk = captions_run["chunks"]["stereo"]
    wav = decode_channels(chunk["audio"], SR)
    assert wav.shape == (2, int(3.0 * SR))
    channel = {"S0": 1, "S1": 0}  # S0 spoke first, on the right channel
    for who, r in rows_of(captions_run, "stereo").items():
        c = channel[who]
        model = codes_from_bytes(r["codes"], r["n_q"], r["frames"])
        user = codes_from_bytes(r["user_codes"], r["n_q"], r["frames"])
        np.testing.assert_array_equal(model, encode_alone(codec, wav[c]))
        np.testing.assert_array_equal(user, encode_alone(codec, wav[1 - c]))


def test_a_chunk_without_turns_fails_for_good(captions_run):
    storage = captions_run["storage"]
    rows = {r["item_id"]: r for r in failures.read_failures(storage, "preprocess")}
    assert set(rows) == {"no-turns"}
    assert rows["no-turns"]["reason"] == NO_SPEAKERS and rows["no-turns"]["attempts"] == 1
    assert NO_SPEAKERS in preprocess.PERMANENT_REASONS
    stats = {s["chunk_id"]: s for s in captions_run["stats"]}
    assert stats["no-turns"]["reason"] == NO_SPEAKERS
    assert all(s["reason"] is None for c, s in stats.items() if c != "no-turns")


def test_whisper_hears_each_chunks_mix_once(tmp_path, one_thread):
    run = stage(tmp_path, "asr", 2)
    heard = [w for call in run["whisper"].calls for w in call]
    mixes = {c: decode_chunk(ch["audio"], SR) for c, ch in run["chunks"].items()}
    assert len(heard) == 3  # dialog, stereo, solo: not per track, not the chunk without turns
    for w in heard:
        assert any(len(m) == len(w) and np.allclose(m, w, atol=1e-6) for m in mixes.values())
    dialog = rows_of(run, "dialog")
    # Whisper's words (w0 … w3 at 0.2 s, 1.2 s, …) go to the speaker of their turn
    assert [w["word"] for w in dialog["S0"]["words"]] == ["w0", "w1"]
    assert [w["word"] for w in dialog["S1"]["words"]] == ["w2", "w3"]
    assert {r["text_source"] for r in run["tokens"]} == {"asr"}


def test_one_stream_rows_have_no_duplex_columns(tmp_path, one_thread):
    run = stage(tmp_path, "captions", 1)
    assert sorted(r["chunk_id"] for r in run["tokens"]) == ["dialog", "no-turns", "solo", "stereo"]
    assert all(r["model_speaker"] is None and r["user_codes"] is None for r in run["tokens"])
    words = {r["chunk_id"]: [w["word"] for w in r["words"]] for r in run["tokens"]}
    assert words["dialog"] == ["hello", "there", "well", "yes"]
    # a two-stream run on this root would find every chunk done: it is refused up front
    preprocess.check_token_streams(run["storage"], 1)
    with pytest.raises(ValueError, match=r"tokenizer\.streams=1.*new storage\.root"):
        preprocess.check_token_streams(run["storage"], 2)


def test_two_streams_need_diarisation():
    with pytest.raises(ConfigError, match="diarize.enabled"):
        load_config(DEFAULT_CONFIG, ["tokenizer.streams=2", "diarize.enabled=false"], env={})
    load_config(DEFAULT_CONFIG, ["tokenizer.streams=1", "diarize.enabled=false"], env={})


def test_the_ray_plan_makes_the_same_rows_and_reruns_add_nothing(tmp_path, ray_session):
    """The real plan (Ray Data) with two streams: the rows of the in-process run, the chunk
    without turns given up for good, and a rerun that finds every chunk done."""
    root = tmp_path / "ray"
    cfg = load_config(
        DEFAULT_CONFIG,
        [f"storage.root={root}", "text.source=captions", "tokenizer.streams=2"],
        env={},
    )
    storage = Storage(str(root))
    rows = dialog_rows()
    storage.write_table("chunks/v.parquet", pa.Table.from_pylist(rows, schema=schema.CHUNKS))
    summary = preprocess.run_preprocess(cfg)
    assert summary["chunks"] == 3 and summary["failures_by_reason"] == {NO_SPEAKERS: 1}
    tokens = storage.read_table("tokens").to_pylist()
    speakers = sorted((r["chunk_id"], r["model_speaker"]) for r in tokens)
    assert speakers == [
        ("dialog", "S0"),
        ("dialog", "S1"),
        ("solo", "S2"),
        ("stereo", "S0"),
        ("stereo", "S1"),
    ]
    again = preprocess.run_preprocess(cfg)
    assert (again["chunks"], again["pending"], again["skipped_failed"]) == (0, 0, 1)
    assert len(storage.read_table("tokens")) == len(tokens)
    one = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"streams": 1})})
    with pytest.raises(ValueError, match=r"tokenizer\.streams=2.*new storage\.root"):
        preprocess.run_preprocess(one)  # before any work: single-stream rows would mix in
