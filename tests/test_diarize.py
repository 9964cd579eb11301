"""Diarisation: DER on the sample dialogues against their RTTM ground truth, the channel
split of the hard-panned stereo file, speaker ids across a video's chunks, and bad input.

DER is ``pyannote.metrics``' DiarizationErrorRate (collar 0.25 s, overlap scored).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from voxtral import failures
from voxtral.audio import flac_decode
from voxtral.config import REPO_ROOT, DiarizeConfig, load_config
from voxtral.diarize import (
    Turn,
    cluster,
    der,
    diarize_file,
    diarize_waveform,
    is_channel_split,
    read_rttm,
    turns_within,
)
from voxtral.media import decode_stream
from voxtral.stages.index import index_local
from voxtral.stages.scrape import chunks_rel, scrape_video
from voxtral.storage import Storage
from voxtral.words import speaker_of

SAMPLE = REPO_ROOT / "data" / "sample"
DIALOGUES = sorted(p.stem for p in SAMPLE.glob("*.rttm"))
MAX_DER = 0.10
HARD_PANNED = "interview_en"


def audio_of(stem: str) -> Path:
    return next(p for p in SAMPLE.glob(f"{stem}.*") if p.suffix not in (".vtt", ".rttm", ".py"))


@pytest.fixture(scope="module")
def diarized() -> dict:
    """Every sample dialogue diarised once with the default config."""
    cfg = DiarizeConfig()
    return {stem: diarize_file(str(audio_of(stem)), cfg) for stem in DIALOGUES}


def test_the_corpus_is_two_speaker_dialogues_with_some_overlap():
    assert len(DIALOGUES) == 5
    for stem in DIALOGUES:
        ref = read_rttm(str(SAMPLE / f"{stem}.rttm"))
        assert len({t.speaker for t in ref}) == 2, stem
        overlap = sum(
            max(0.0, min(a.end_s, b.end_s) - max(a.start_s, b.start_s))
            for i, a in enumerate(ref)
            for b in ref[i + 1 :]
            if a.speaker != b.speaker
        )
        speech = sum(t.end_s - t.start_s for t in ref) - overlap
        assert 0.005 < overlap / speech < 0.08, (stem, overlap / speech)


def test_der_on_each_sample_dialogue(diarized):
    figures = {}
    for stem, d in diarized.items():
        figures[stem] = der(read_rttm(str(SAMPLE / f"{stem}.rttm")), d.turns)
        f = figures[stem]
        print(f"{stem}: method={d.method} speakers={d.speakers} DER={f['der']:.2%} "
              f"(missed {f['missed']:.2f} s, false alarm {f['false_alarm']:.2f} s, "
              f"confusion {f['confusion']:.2f} s of {f['total']:.1f} s)")  # fmt: skip
    for stem, f in figures.items():
        assert f["der"] <= MAX_DER, (stem, f)
        assert diarized[stem].speakers == 2, stem


def test_hard_panned_stereo_is_split_by_channel(diarized):
    d = diarized[HARD_PANNED]
    assert d.method == "channels" and d.stats["channel_corr"] < 0.5
    assert der(read_rttm(str(SAMPLE / f"{HARD_PANNED}.rttm")), d.turns)["der"] < 0.02
    assert any(t.overlap for t in d.turns)  # both channels loud at once: exact overlap


def test_mono_and_panned_mixes_are_not_split_by_channel(diarized):
    for stem, d in diarized.items():
        if stem != HARD_PANNED:
            assert d.method == "embeddings", stem
    # the rule itself: one signal panned both ways vs two independent tracks
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 400, 256))
    speech = np.ones(400, bool)
    panned = np.stack([0.9 * a, 0.4 * a])
    energy = np.square(panned).sum(-1).T
    assert not is_channel_split(energy, (panned[0] * panned[1]).sum(-1), speech)[0]
    half = np.arange(400) < 200  # speaker A on the left, then speaker B on the right
    tracks = np.stack([a * half[:, None], b * ~half[:, None]]) + 1e-3 * rng.standard_normal(
        (2, 400, 256)
    )
    energy = np.square(tracks).sum(-1).T
    assert is_channel_split(energy, (tracks[0] * tracks[1]).sum(-1), speech)[0]


def test_clustering_counts_speakers():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(256)
    voices = [base + 0.8 * rng.standard_normal(256) for _ in range(3)]

    def windows(idx: list[int]) -> np.ndarray:
        x = np.stack([voices[i] + 0.3 * rng.standard_normal(256) for i in idx])
        return np.abs(x) / np.linalg.norm(np.abs(x), axis=1, keepdims=True)

    one = cluster(windows([0] * 60), 0.1, 8)
    assert set(one) == {0}
    three = cluster(windows([0] * 30 + [1] * 30 + [2] * 30 + [0] * 10), 0.1, 8)
    assert list(three[:30]) == [0] * 30 and set(three[30:60]) == {1} and set(three[60:90]) == {2}
    assert set(three[90:]) == {0}  # the same voice again gets the same id
    assert set(cluster(windows([0] * 30 + [1] * 30 + [2] * 30), 0.1, 2)) == {0, 1}  # capped


def test_speaker_ids_are_consistent_across_the_chunks_of_a_video(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for stem in ("debat_fr", HARD_PANNED):
        for p in SAMPLE.glob(f"{stem}.*"):
            shutil.copy(p, corpus / p.name)
    cfg = load_config(None, [f"storage.root={tmp_path / 'run'}", f"index.local_dir={corpus}",
                             "index.source=local", "scrape.min_chunk_s=5",
                             "scrape.max_chunk_s=12"], env={})  # fmt: skip
    storage = Storage(cfg.storage.root)
    for row in index_local(cfg.index):
        stem = Path(row["url"]).stem
        out = scrape_video(row, cfg)
        assert out["status"] == "done" and out["chunks"] >= 3, out
        rows = storage.read_table(chunks_rel(row["video_id"])).to_pylist()
        turns = [Turn(r["start_s"] + t["start_s"], r["start_s"] + t["end_s"], t["speaker"],
                      t["overlap"]) for r in rows for t in r["turns"]]  # fmt: skip
        # chunk turns put back on the video's timeline score like the whole-video turns:
        # a speaker id that changed meaning between chunks would count as confusion
        ref = read_rttm(str(SAMPLE / f"{stem}.rttm"))
        assert der(ref, turns)["der"] <= MAX_DER, stem
        assert {t.speaker for t in turns} == {"S0", "S1"}
        split = stem == HARD_PANNED
        assert out["diarization"] == ("channels" if split else "embeddings")
        for r in rows:
            assert r["diarization"] == out["diarization"]
            assert r["channels"] == (2 if split else 1)
            assert sf.info(io.BytesIO(r["audio"])).channels == r["channels"]
            assert flac_decode(r["audio"])[0].ndim == 1  # readers still get mono
            for t in r["turns"]:
                assert 0 <= t["start_s"] < t["end_s"] <= r["duration_s"] + 1e-3
        words = [(r["start_s"] + w["start_s"], w["speaker"]) for r in rows for w in r["captions"]]
        # each word's speaker: the ground-truth speaker at the word, through one mapping
        mapping: dict[str, dict[str, int]] = {}
        for t, who in words:
            truth = next((x.speaker for x in ref if x.start_s - 0.1 <= t <= x.end_s + 0.1), None)
            if truth and who:
                mapping.setdefault(who, {}).setdefault(truth, 0)
                mapping[who][truth] += 1
        agree = sum(max(v.values()) for v in mapping.values())
        assert agree >= 0.9 * len(words), (stem, mapping)


def _wav(path: Path, x: np.ndarray, rate: int = 16000) -> Path:
    sf.write(str(path), x.astype(np.float32), rate)
    return path


def test_silence_one_speaker_and_very_short_audio(tmp_path):
    cfg = DiarizeConfig()
    silent = diarize_file(str(_wav(tmp_path / "silence.wav", np.zeros(16000 * 5))), cfg)
    assert (silent.method, silent.turns, silent.speakers) == ("none", [], 0)
    # one voice: the host's segments of the podcast, back to back
    host = [t for t in read_rttm(str(SAMPLE / "podcast_en.rttm")) if t.speaker == "Host"]
    wav = np.concatenate(list(decode_stream(str(audio_of("podcast_en")), 16000)))
    parts = [wav[int(t.start_s * 16000) : int(t.end_s * 16000)] for t in host]
    gap = np.zeros(8000, np.float32)
    alone = np.concatenate([x for p in parts for x in (p, gap)])
    one = diarize_file(str(_wav(tmp_path / "host.wav", alone)), cfg)
    assert one.method == "embeddings" and one.speakers == 1, one.speakers
    assert not any(t.overlap for t in one.turns)
    short_wav = np.concatenate([gap, parts[0][:12000]])  # 0.5 s of nothing, 0.75 s of voice
    short = diarize_file(str(_wav(tmp_path / "short.wav", short_wav)), cfg)
    assert short.speakers == 1 and short.turns and short.turns[0].end_s <= 1.3
    tiny = diarize_file(str(_wav(tmp_path / "tiny.wav", parts[0][:1600])), cfg)
    assert tiny.speakers <= 1
    # the same voice in memory, in stereo with both channels alike: not split, one speaker
    both = diarize_waveform(np.stack([alone, alone]), 16000, cfg)
    assert (both.method, both.speakers) == ("embeddings", 1)


def test_pyannote_without_the_package_is_a_clear_config_error():
    with pytest.raises(ValidationError, match="pyannote.audio"):
        DiarizeConfig(method="pyannote")
    with pytest.raises(ValidationError, match="hop_s"):
        DiarizeConfig(window_s=1.0, hop_s=2.0)


def test_turns_within_a_chunk_and_word_speakers():
    turns = [Turn(0.0, 4.0, "S0"), Turn(3.5, 9.0, "S1", True)]
    got = turns_within(turns, 3.0, 8.0)
    assert [(t["start_s"], t["end_s"], t["speaker"]) for t in got] == [
        (0.0, 1.0, "S0"),
        (0.5, 5.0, "S1"),
    ]
    assert speaker_of(got, 0.1, 0.4) == "S0" and speaker_of(got, 2.0, 2.5) == "S1"
    assert speaker_of(got, 5.2, 5.4) == "S1"  # just past the turn: the nearest one
    assert speaker_of([], 0.0, 1.0) is None


def test_decode_stream_keeps_two_channels_on_request(tmp_path):
    t = np.arange(16000) / 16000
    left, right = 0.3 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 500 * t)
    path = tmp_path / "lr.wav"
    sf.write(str(path), np.stack([left, right], 1).astype(np.float32), 16000, subtype="PCM_16")
    blocks = list(decode_stream(str(path), 16000, block_s=0.3, stereo=True))
    assert all(b.ndim == 2 and b.shape[0] == 2 for b in blocks)
    got = np.concatenate(blocks, axis=1)
    np.testing.assert_allclose(got[0], left, atol=1e-3)
    np.testing.assert_allclose(got[1], right, atol=1e-3)
    mono = list(decode_stream(str(_wav(tmp_path / "m.wav", left)), 16000, stereo=True))
    assert all(b.ndim == 1 for b in mono)
    with av.open(str(path)) as c:  # the plain decode still down-mixes
        assert c.streams.audio[0].channels == 2
    plain = np.concatenate(list(decode_stream(str(path), 16000)))
    np.testing.assert_allclose(plain, (left + right) / 2, atol=1e-3)


def test_a_failed_diarisation_keeps_the_chunks_and_says_so(tmp_path, monkeypatch):
    import voxtral.diarize.chunks as chunks
    import voxtral.stages.scrape as scrape

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no voice encoder here")

    monkeypatch.setattr(chunks, "StreamingDiarizer", Broken)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(audio_of("debat_fr"), corpus / audio_of("debat_fr").name)
    cfg = load_config(None, [f"storage.root={tmp_path / 'run'}", f"index.local_dir={corpus}",
                             "index.source=local", "scrape.min_chunk_s=5",
                             "scrape.max_chunk_s=12"], env={})  # fmt: skip
    (row,) = index_local(cfg.index)
    out = scrape_video(row, cfg)
    assert out["status"] == "done" and out["chunks"] >= 3
    assert out["diarization"] == "failed" and "no voice encoder" in out["diarize_error"]
    (row,) = failures.read_failures(Storage(cfg.storage.root), "diarize")
    assert (row["item_id"], row["reason"]) == (out["video_id"], "diarize_error")
    assert "no voice encoder" in row["error"]
    rows = Storage(cfg.storage.root).read_table(chunks_rel(row["video_id"])).to_pylist()
    assert len(rows) == out["chunks"]
    assert all(r["diarization"] == "failed" and r["turns"] == [] for r in rows)
    summary = scrape.summarize([out], 1.0, {})
    assert summary["diarize_failed"] == 1 and "diarisation failed" in scrape.format_summary(
        {**summary, "index_videos": 1, "done_before": 0, "out_of_attempts": 0}
    )
