"""Speech recognition: the tiny Whisper through the real loading path, batching, word times
and language, and through the preprocess stage (``text.source``, failures, reruns)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._speech import speech_clip
from tests.commands import ONE_STREAM_ENCODEC
from voxtral import asr, failures, schema
from voxtral.audio import flac_encode, prepare
from voxtral.codec import codec_info
from voxtral.config import DEFAULT_CONFIG, load_config
from voxtral.model import load_text_tokenizer, resolve_base
from voxtral.stages import preprocess
from voxtral.storage import Storage
from voxtral.tokenizer import timed_text_ids

SR = 24_000  # chunk rows hold audio at the codec rate
LENGTHS_S = (1.3, 6.0, 17.0, 29.9)  # mixed lengths, all within one 30 s window


def clip(seconds: float, shift: int = 0) -> np.ndarray:
    """``seconds`` of real speech at :data:`SR` (the clip tiled, rotated by ``shift``)."""
    wav, sr = speech_clip()
    wav = prepare(wav, sr, SR).numpy()
    n = int(seconds * SR)
    return np.roll(np.tile(wav, math.ceil(n / len(wav)) + 1), -shift)[:n].copy()


@pytest.fixture(scope="module")
def transcriber(one_thread) -> asr.Transcriber:
    return asr.Transcriber(asr.TINY, batch_size=4, max_new_tokens=16)


@pytest.fixture(scope="module")
def mixed(transcriber) -> dict:
    """Chunks of mixed lengths, transcribed as one batch and one by one."""
    wavs = [clip(s, shift=i * 3000) for i, s in enumerate(LENGTHS_S)]
    batch = transcriber.transcribe(wavs, SR)
    alone = [transcriber.transcribe([w], SR)[0] for w in wavs]
    return {"wavs": wavs, "batch": batch, "alone": alone}


def assert_times_sound(words: list[dict], duration_s: float) -> None:
    """Monotone starts and ends, each end at or after its start, all inside the chunk."""
    for w in words:
        assert 0.0 <= w["start_s"] <= w["end_s"] <= duration_s + 1e-6, w
    starts = [w["start_s"] for w in words]
    ends = [w["end_s"] for w in words]
    assert starts == sorted(starts) and ends == sorted(ends)


# -- the tiny model ------------------------------------------------------------------------
def test_tiny_whisper_is_a_whisper_folder(transcriber):
    """Loaded through ``from_pretrained`` like the hub model, with what generation needs."""
    from transformers import AutoConfig, GenerationConfig, WhisperTokenizer

    path = asr.resolve_asr_model(asr.TINY)
    assert AutoConfig.from_pretrained(path).model_type == "whisper"
    gen = GenerationConfig.from_pretrained(path)
    assert gen.alignment_heads and gen.lang_to_id and gen.task_to_id and gen.is_multilingual
    tok = WhisperTokenizer.from_pretrained(path)
    # Whisper's id order: the special tokens end with <|notimestamps|>, timestamps follow
    assert tok.all_special_ids[-1] == gen.no_timestamps_token_id
    assert tok.convert_tokens_to_ids("<|0.00|>") == gen.no_timestamps_token_id + 1
    assert tok.convert_tokens_to_ids("<|30.00|>") == len(tok) - 1
    ids = tok(" so what do you think", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == " so what do you think"
    assert transcriber.model.config.vocab_size == len(tok)


def test_resolve_asr_model_refuses_a_folder_without_a_model(tmp_path):
    assert asr.resolve_asr_model("openai/whisper-large-v3-turbo") == "openai/whisper-large-v3-turbo"
    with pytest.raises(FileNotFoundError, match="asr_model"):
        asr.resolve_asr_model(str(tmp_path))


# -- batching, times, language -------------------------------------------------------------
def test_batch_of_mixed_lengths_gives_the_words_of_one_by_one(mixed):
    """Whisper pads every chunk to its 30 s window, so a chunk in a batch is what it is
    alone: the same words and language; times equal up to one DTW frame (20 ms), the room
    float rounding of a batched matmul may take."""
    assert any(t.words for t in mixed["batch"])  # the check below is not vacuous
    for b, a in zip(mixed["batch"], mixed["alone"], strict=True):
        assert b.language == a.language
        assert [w["word"] for w in b.words] == [w["word"] for w in a.words]
        for wb, wa in zip(b.words, a.words, strict=True):
            assert abs(wb["start_s"] - wa["start_s"]) <= asr.TIME_PRECISION + 1e-6
            assert abs(wb["end_s"] - wa["end_s"]) <= asr.TIME_PRECISION + 1e-6


def test_times_monotone_and_inside_each_chunk(mixed):
    for t, wav in zip(mixed["batch"], mixed["wavs"], strict=True):
        assert_times_sound(t.words, len(wav) / SR)
    # DTW is cropped to each chunk's own frames: the short chunk's words stay in it
    assert mixed["batch"][0].words and mixed["batch"][0].words[-1]["end_s"] <= LENGTHS_S[0]


def test_a_chunk_over_30_s_is_windowed_and_joined(transcriber):
    wav = clip(41.0)
    (t,) = transcriber.transcribe([wav], SR)
    assert_times_sound(t.words, 41.0)
    # the second window's words come after its offset
    assert any(w["start_s"] >= asr.WINDOW_S for w in t.words)
    first = transcriber.transcribe([wav[: int(asr.WINDOW_S * SR)]], SR)[0]
    assert [w["word"] for w in t.words[: len(first.words)]] == [w["word"] for w in first.words]


def test_language_is_whispers_language_argmax(transcriber, mixed):
    """The stored language is the language token the decoder rates highest after
    ``<|startoftranscript|>``, computed here on its own from the features."""
    model, fe = transcriber.model, transcriber.processor.feature_extractor
    gen = model.generation_config
    lang_ids = torch.tensor(sorted(gen.lang_to_id.values()))
    tok = transcriber.processor.tokenizer
    for t, wav in zip(mixed["batch"], mixed["wavs"], strict=True):
        feats = fe(prepare(wav, SR, 16_000).numpy(), sampling_rate=16_000, return_tensors="pt")
        start = torch.tensor([[gen.decoder_start_token_id]])
        with torch.no_grad():
            logits = model(feats.input_features, decoder_input_ids=start).logits[0, -1]
        best = int(lang_ids[logits[lang_ids].argmax()])
        assert t.language == tok.convert_ids_to_tokens(best).strip("<|>")


def test_transcribe_each_isolates_the_chunk_at_fault(transcriber, monkeypatch):
    wavs = [clip(2.0), clip(3.0), clip(4.0)]
    real_run = transcriber._run

    def run(windows):
        if any(len(w) == 3 * 16_000 for w in windows):
            raise RuntimeError("whisper fails on this chunk")
        return real_run(windows)

    monkeypatch.setattr(transcriber, "_run", run)
    out = transcriber.transcribe_each(wavs, SR)
    assert isinstance(out[1], RuntimeError)
    assert all(isinstance(out[i], asr.Transcript) for i in (0, 2))


# -- pure functions ------------------------------------------------------------------------
finite = st.one_of(st.floats(-5, 40), st.just(math.nan))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, finite), max_size=20), st.floats(0, 35))
def test_repair_times_makes_any_times_sound(times, duration):
    words = [{"word": f"w{i}", "start_s": a, "end_s": b} for i, (a, b) in enumerate(times)]
    fixed = asr.repair_times(words, duration)
    assert [w["word"] for w in fixed] == [w["word"] for w in words]
    assert_times_sound(fixed, duration)
    # times that were sound already are left alone
    assert asr.repair_times(fixed, duration) == fixed


def test_words_from_tokens_groups_at_spaces_and_times_words(transcriber):
    tok = transcriber.processor.tokenizer
    ids = tok(" so what, do you", add_special_tokens=False)["input_ids"]
    times = [0.1 * (i + 1) for i in range(len(ids) + 1)]  # one more: the end of text
    words = asr.words_from_tokens(tok, ids, times)
    assert [w["word"] for w in words] == ["so", "what,", "do", "you"]
    pieces = tok.convert_ids_to_tokens(ids)
    spans = asr.word_spans(pieces)
    for w, (a, b) in zip(words, spans, strict=True):
        assert (w["start_s"], w["end_s"]) == (times[a], times[b])
    # a language written without spaces: a word per character
    zh = tok("你好", add_special_tokens=False)["input_ids"]
    chars = asr.words_from_tokens(tok, zh, [0.0] * (len(zh) + 1), language="zh")
    assert [w["word"] for w in chars] == ["你", "好"]


def test_windows_cover_the_chunk():
    assert asr.windows(10, 16_000) == [(0, 10)]
    assert asr.windows(int(61 * 16_000), 16_000) == [
        (0, 480_000),
        (480_000, 960_000),
        (960_000, 976_000),
    ]


# -- through the preprocess stage ----------------------------------------------------------
def chunk_rows(video_id: str, lengths_s: list[float], captioned: set[int]) -> list[dict]:
    rows = []
    for i, seconds in enumerate(lengths_s):
        wav = clip(seconds, shift=4000 * i)
        captions = None
        if i in captioned:
            captions = [
                {"word": "hello", "start_s": 0.2, "end_s": 0.5},
                {"word": "there", "start_s": 0.6, "end_s": 0.9},
            ]
        rows.append(
            {
                "chunk_id": f"{video_id}-{i:04d}",
                "video_id": video_id,
                "start_s": 10.0 * i,
                "duration_s": len(wav) / SR,
                "sample_rate": SR,
                "audio": flac_encode(wav, SR),
                "speech_ratio": 0.9,
                "captions": captions,
            }
        )
    return rows


def write_chunks(storage: Storage, rows: list[dict]) -> None:
    storage.write_table(
        f"chunks/{rows[0]['video_id']}.parquet", pa.Table.from_pylist(rows, schema=schema.CHUNKS)
    )


def stage_cfg(root, *sets: str):
    return load_config(
        DEFAULT_CONFIG,
        # one stream: these chunks carry no speaker turns to split into two
        [f"storage.root={root}", "text.max_new_tokens=16", *ONE_STREAM_ENCODEC, *sets],
        env={},
    )


def tokens_by_chunk(storage: Storage) -> dict[str, dict]:
    return {r["chunk_id"]: r for r in storage.read_table("tokens").to_pylist()}


def run_in_process(cfg, storage: Storage, transcriber) -> list[pa.Table]:
    """The stage's per-batch functions in this process, in the plan's order, with the given
    transcriber (the Ray plan builds its own in each actor)."""
    info = codec_info(cfg.codec)
    chunks = storage.read_table("chunks")
    done = set(tokens_by_chunk(storage)) if storage.exists("tokens") else set()
    packed = preprocess.decode_batch(
        chunks,
        sample_rate=info.sample_rate,
        hop=info.hop,
        batch_size=cfg.preprocess.batch_size,
        max_pad=cfg.preprocess.max_pad,
        skip=frozenset(done),
    )
    rows = [
        preprocess.transcribe_row(transcriber, meta, pcm.as_py(), info.sample_rate, cfg.text.source)
        for meta, pcm in zip(packed.drop_columns(["pcm"]).to_pylist(), packed["pcm"], strict=True)
    ]
    transcribed = preprocess.with_pcm(rows, packed["pcm"])
    encoder = preprocess.ChunkEncoder(cfg.codec, cfg.preprocess)
    return preprocess.write_batch(
        encoder(transcribed),
        root=storage.root_uri,
        base=cfg.model.base,
        failed_before=frozenset(),
    )


class Faulty:
    """The real transcriber, failing on chunks of one length (in samples at :data:`SR`,
    the rate of chunk rows and of the packed PCM)."""

    def __init__(self, transcriber: asr.Transcriber, bad_samples: int):
        self.transcriber, self.bad_samples = transcriber, bad_samples

    def transcribe_each(self, waveforms, sample_rate):
        assert sample_rate == SR
        out = self.transcriber.transcribe_each(waveforms, sample_rate)
        return [
            RuntimeError("injected whisper failure") if len(w) == self.bad_samples else res
            for w, res in zip(waveforms, out, strict=True)
        ]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, ray_session, transcriber) -> dict:
    """Video ``vc`` first goes through the stage's functions in this process, with Whisper
    failing on one chunk; then ``text.source=auto`` through the real stage on ``va``, ``vb``
    (captions on two chunks of five) and what ``vc`` misses."""
    root = tmp_path_factory.mktemp("asr-stage") / "run"
    storage = Storage(str(root))
    cfg = stage_cfg(root)
    vc = chunk_rows("vc", [2.5, 3.5, 4.5], captioned={0})
    write_chunks(storage, vc)
    in_process = run_in_process(cfg, storage, Faulty(transcriber, int(4.5 * SR)))
    before = {
        "stats": in_process,
        "tokens": tokens_by_chunk(storage),
        "failures": failures.read_failures(storage, "preprocess"),
    }
    write_chunks(storage, chunk_rows("va", [2.0, 5.5, 3.0], captioned={0}))
    write_chunks(storage, chunk_rows("vb", [4.0, 7.5], captioned={1}))
    summary = preprocess.run_preprocess(cfg)
    return {"cfg": cfg, "storage": storage, "summary": summary, "before": before, "vc": vc}


def test_auto_takes_captions_where_they_exist_and_asr_elsewhere(auto_run):
    from transformers import GenerationConfig

    storage, cfg = auto_run["storage"], auto_run["cfg"]
    chunks = {r["chunk_id"]: r for r in storage.read_table("chunks").to_pylist()}
    tokens = tokens_by_chunk(storage)
    assert sorted(tokens) == sorted(chunks)
    text_tok = load_text_tokenizer(resolve_base(cfg.model))
    gen = GenerationConfig.from_pretrained(asr.resolve_asr_model(asr.TINY))
    languages = {token.strip("<|>") for token in gen.lang_to_id}
    for cid, t in tokens.items():
        c = chunks[cid]
        if c["captions"]:
            assert t["text_source"] == "captions" and t["language"] is None
            assert [w["word"] for w in t["words"]] == [w["word"] for w in c["captions"]]
            assert all(w["speaker"] is None for w in t["words"])
        else:
            assert t["text_source"] in ("asr", "none") and t["language"] in languages
            assert_times_sound(t["words"], c["duration_s"])
        # the ids are those of the chosen words, at their times
        ids, starts = timed_text_ids(text_tok, t["words"])
        assert t["text_ids"] == ids
        assert t["text_starts_s"] == pytest.approx(starts)
    assert sum(t["text_source"] == "asr" for t in tokens.values()) >= 2


def test_summary_reports_where_the_words_of_the_audio_came_from(auto_run):
    storage, s = auto_run["storage"], auto_run["summary"]
    tokens = tokens_by_chunk(storage)
    for cid in auto_run["before"]["tokens"]:  # made before this run: not in its summary
        del tokens[cid]
    chunks = {r["chunk_id"]: r for r in storage.read_table("chunks").to_pylist()}
    want = {k: 0.0 for k in schema.TEXT_SOURCES}
    for cid, t in tokens.items():
        want[t["text_source"]] += chunks[cid]["duration_s"]
    total = sum(want.values())
    assert s["text_seconds"] == pytest.approx(want, abs=1e-3)
    assert s["text_share"] == pytest.approx({k: v / total for k, v in want.items()}, abs=1e-4)
    assert s["text_share"]["captions"] > 0 and s["text_share"]["asr"] > 0
    table = preprocess.format_summary(s)
    assert f"captions {100 * s['text_share']['captions']:.1f}%" in table


def test_captions_source_never_runs_asr(auto_run, tmp_path):
    """With ``text.source=captions`` Whisper is never called (the plan builds no ASR pool:
    see the next test), and chunks without captions get no words."""

    class NoWhisper:
        def transcribe_each(self, waveforms, sample_rate):
            raise AssertionError("Whisper ran under text.source=captions")

    storage = Storage(str(tmp_path / "run"))
    for video in ("va", "vb", "vc"):
        table = auto_run["storage"].read_table(f"chunks/{video}.parquet")
        storage.write_table(f"chunks/{video}.parquet", table)
    cfg = stage_cfg(tmp_path / "run", "text.source=captions")
    stats = run_in_process(cfg, storage, NoWhisper())
    assert stats["reason"].null_count == len(stats)  # no failures
    tokens = tokens_by_chunk(storage)
    assert len(tokens) == len(stats) == 8
    for t in tokens.values():
        assert t["language"] is None and t["text_source"] in ("captions", "none")
        assert (t["text_source"] == "none") == (not t["words"])
    assert {t["text_source"] for t in tokens.values()} == {"captions", "none"}


def test_whisper_starts_only_where_a_pending_chunk_lacks_captions(tmp_path):
    """The plan counts, before it starts anything, the pending chunks Whisper has to
    transcribe: under ``auto`` a corpus with captions everywhere gets no Whisper actor."""
    from voxtral.stages.preprocess import pending_chunks

    storage = Storage(str(tmp_path / "run"))
    write_chunks(storage, chunk_rows("va", [2.0, 3.0, 2.5], captioned={0, 2}))
    write_chunks(storage, chunk_rows("vb", [2.0], captioned={0}))
    ids = [f"va-{i:04d}" for i in range(3)] + ["vb-0000"]
    assert pending_chunks(storage, set(), "auto").asr == 1
    assert pending_chunks(storage, set(), "asr").asr == 4
    assert pending_chunks(storage, set(), "captions").asr == 0
    done_uncaptioned = pending_chunks(storage, {ids[1]}, "auto")
    assert (done_uncaptioned.asr, done_uncaptioned.count) == (0, 3)
    everything_done = pending_chunks(storage, set(ids), "auto")
    assert (everything_done.files, everything_done.count) == ([], 0)


def test_a_failing_chunk_is_recorded_and_a_rerun_does_only_it(auto_run):
    storage, vc, before = auto_run["storage"], auto_run["vc"], auto_run["before"]
    bad = vc[2]["chunk_id"]
    stats = before["stats"]
    assert dict(zip(*(stats[k].to_pylist() for k in ("chunk_id", "reason")), strict=True)) == {
        vc[0]["chunk_id"]: None,
        vc[1]["chunk_id"]: None,
        bad: preprocess.ASR_ERROR,
    }
    (failure,) = before["failures"]
    assert (failure["item_id"], failure["reason"], failure["attempts"]) == (bad, "asr_error", 1)
    assert "injected" in failure["error"]
    assert sorted(before["tokens"]) == sorted(r["chunk_id"] for r in vc[:2])
    # the real stage did the other videos and the missing chunk only, and cleared its failure
    summary = auto_run["summary"]
    assert (summary["chunks"], summary["already_done"], summary["failures"]) == (6, 2, 0)
    after = tokens_by_chunk(storage)
    assert {k: after[k] for k in before["tokens"]} == before["tokens"]
    assert after[bad]["text_source"] in ("asr", "none") and after[bad]["language"]
    assert failures.read_failures(storage, "preprocess") == []
