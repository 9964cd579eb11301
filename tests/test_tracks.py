"""voxtral/tracks.py: one diarised chunk → a model track and a user track per main speaker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxtral.tracks import (
    DuplexExample,
    duplex_examples,
    infer_channel_of,
    main_speakers,
    speaker_gains,
    split_tracks,
    words_of,
)

SR = 8000
FADE_S = 0.02
F = round(FADE_S * SR)
N = 4 * SR
# S0 and S1 overlap in [0.9, 1.0] and [2.0, 2.1]; nobody speaks in [0, 0.1], [2.8, 3], [3.6, 4]
TURNS = [
    {"start_s": 0.1, "end_s": 1.0, "speaker": "S0", "overlap": True},
    {"start_s": 0.9, "end_s": 2.1, "speaker": "S1", "overlap": True},
    {"start_s": 2.0, "end_s": 2.8, "speaker": "S0", "overlap": True},
    {"start_s": 3.0, "end_s": 3.6, "speaker": "S1", "overlap": False},
]


def _mask(turns, speaker=None, pad_s=0.0, n=N, sr=SR) -> np.ndarray:
    m = np.zeros(n, bool)
    for t in turns:
        if speaker is None or t["speaker"] == speaker:
            a = max(0, round((t["start_s"] - pad_s) * sr))
            m[a : max(a, round((t["end_s"] + pad_s) * sr))] = True
    return m


def _tone(hz: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(N) / SR)).astype(np.float32)


@pytest.fixture
def voices():
    """Two voices, a 300 Hz and a 1100 Hz tone, each sounding in its own turns, plus a
    faint background everywhere (what no turn holds)."""
    s0 = _tone(300) * _mask(TURNS, "S0")
    s1 = _tone(1100) * _mask(TURNS, "S1")
    noise = 0.01 * np.random.default_rng(0).standard_normal(N).astype(np.float32)
    return s0, s1, s0 + s1 + noise


def test_mono_mix_splits_by_turns_with_overlap_in_both(voices):
    s0, s1, mix = voices
    model, user = split_tracks(mix, SR, TURNS, "S0", fade_s=FADE_S)
    assert model.dtype == user.dtype == np.float32 and model.shape == user.shape == mix.shape
    near0, near1 = _mask(TURNS, "S0", FADE_S + 2 / SR), _mask(TURNS, "S1", FADE_S + 2 / SR)
    only0 = _mask(TURNS, "S0") & ~near1  # S0 alone, away from S1's fades
    only1 = _mask(TURNS, "S1") & ~near0
    both = _mask(TURNS, "S0") & _mask(TURNS, "S1")
    assert only0.sum() > SR and only1.sum() > SR and both.sum() > 0.15 * SR
    # the model track is S0: all of the mix in S0's turns, nothing in S1's
    np.testing.assert_array_equal(model[only0], mix[only0])
    assert not model[only1].any() and not user[only0].any()
    np.testing.assert_array_equal(user[only1], mix[only1])
    # the overlap is in both tracks, whole
    np.testing.assert_array_equal(model[both], mix[both])
    np.testing.assert_array_equal(user[both], mix[both])
    # the 1100 Hz voice (S1) has no energy in the model track outside the overlaps
    leak = model * ~_mask(TURNS, "S0", FADE_S + 2 / SR)
    assert np.sum(leak**2) == 0.0
    # nobody's audio (the gaps: background) goes to the user track, none to the model's
    gap = ~_mask(TURNS, None, FADE_S + 2 / SR)
    assert gap.sum() > 0.5 * SR and not model[gap].any()
    np.testing.assert_array_equal(user[gap], mix[gap])
    # away from the overlaps (and their fades) the tracks add up to the mix
    off = ~(np.convolve(both, np.ones(2 * F + 3), "same") > 0)
    np.testing.assert_allclose((model + user)[off], mix[off], atol=1e-6)
    # with residual="none" the gaps are silent in both
    _, user_none = split_tracks(mix, SR, TURNS, "S0", fade_s=FADE_S, residual="none")
    assert not user_none[gap].any()
    np.testing.assert_array_equal(user_none[only1], mix[only1])


def test_the_other_speaker_is_the_mirror_image(voices):
    _, _, mix = voices
    m0, u0 = split_tracks(mix, SR, TURNS, "S0", fade_s=FADE_S, residual="none")
    m1, u1 = split_tracks(mix, SR, TURNS, "S1", fade_s=FADE_S, residual="none")
    np.testing.assert_array_equal(m0, u1)
    np.testing.assert_array_equal(m1, u0)


def test_fades_are_continuous_no_clicks(voices):
    g = speaker_gains(TURNS, "S0", N, SR, FADE_S)
    assert g.dtype == np.float32 and g.min() == 0.0 and g.max() == 1.0
    assert np.abs(np.diff(g)).max() <= 1 / F + 1e-6
    # a ramp really is there: the gain takes F intermediate values at each edge
    assert ((g > 0) & (g < 1)).sum() == 4 * F
    # a constant signal cut by the gains never jumps by more than one fade step
    model, user = split_tracks(np.ones(N, np.float32), SR, TURNS, "S0", fade_s=FADE_S)
    assert np.abs(np.diff(model)).max() <= 1 / F + 1e-6
    assert np.abs(np.diff(user)).max() <= 1 / F + 1e-6
    # fade_s=0: hard edges exactly at the turns
    np.testing.assert_array_equal(speaker_gains(TURNS, "S0", N, SR, 0.0), _mask(TURNS, "S0"))


def test_turns_are_clamped_to_the_chunk():
    turns = [{"start_s": -1.0, "end_s": 0.5, "speaker": "A"},
             {"start_s": 3.9, "end_s": 9.0, "speaker": "A"},
             {"start_s": 5.0, "end_s": 6.0, "speaker": "A"}]  # fmt: skip
    g = speaker_gains(turns, "A", N, SR)
    assert g.shape == (N,) and g[0] == 1.0 and g[-1] == 1.0 and g[SR] == 0.0
    assert not speaker_gains(turns, "B", N, SR).any()
    assert speaker_gains([], "A", 0, SR).shape == (0,)


_turn = st.tuples(
    st.floats(-0.5, 3.0, allow_nan=False),
    st.floats(0.0, 1.5, allow_nan=False),
    st.sampled_from(["A", "B", "C"]),
)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.lists(_turn, max_size=8),
    fade_s=st.sampled_from([0.0, 0.001, 0.005, 0.02, 0.05]),
    sr=st.sampled_from([1000, 1600]),
)
def test_gain_invariants_over_random_turns(raw, fade_s, sr):
    n = int(2.5 * sr)
    turns = [{"start_s": a, "end_s": a + d, "speaker": s} for a, d, s in raw]
    g = speaker_gains(turns, "A", n, sr, fade_s)
    f = round(fade_s * sr)
    assert g.shape == (n,) and g.dtype == np.float32
    assert g.min(initial=0.0) >= 0.0 and g.max(initial=0.0) <= 1.0
    if n > 1:
        assert np.abs(np.diff(g)).max() <= 1 / (f + 1) + 1e-6
    t = np.arange(n) / sr
    far = np.ones(n, bool)
    for x in turns:
        if x["speaker"] != "A":
            continue
        inside = (t >= x["start_s"] + 1 / sr) & (t <= x["end_s"] - 1 / sr)
        assert (g[inside] == 1.0).all()
        far &= (t < x["start_s"] - fade_s - 2 / sr) | (t > x["end_s"] + fade_s + 2 / sr)
    assert (g[far] == 0.0).all()
    # on a mono mix nothing is lost with the residual in the user track, and the tracks
    # add up to the mix wherever no other speaker's gain is on
    model, user = split_tracks(np.ones(n, np.float32), sr, turns, "A", fade_s=fade_s)
    assert ((model + user) >= 1.0 - 1e-6).all()
    others = sum(speaker_gains(turns, s, n, sr, fade_s) for s in ("B", "C"))
    np.testing.assert_allclose((model + user)[others == 0], 1.0, atol=1e-6)


def test_channel_split_stereo_gives_the_exact_channels():
    rng = np.random.default_rng(1)
    wav = rng.standard_normal((2, N)).astype(np.float32)
    model, user = split_tracks(wav, SR, TURNS, "S0", channels=2, channel_of={"S0": 1, "S1": 0})
    np.testing.assert_array_equal(model, wav[1])
    np.testing.assert_array_equal(user, wav[0])
    model, user = split_tracks(wav, SR, TURNS, "S1", channel_of={"S0": 1, "S1": 0})
    np.testing.assert_array_equal(model, wav[0])
    np.testing.assert_array_equal(user, wav[1])
    # channels first only: [n, 2] is refused, not guessed
    with pytest.raises(ValueError, match=r"\[2, n\]"):
        split_tracks(wav.T, SR, TURNS, "S0", channel_of={"S0": 1, "S1": 0})
    with pytest.raises(ValueError, match="no channel"):
        split_tracks(wav, SR, TURNS, "S9", channel_of={"S0": 1, "S1": 0})
    # two channels that are not a split source (channels=1): their mix, cut by gains
    got = split_tracks(wav, SR, TURNS, "S0", channels=1)
    want = split_tracks(wav.mean(axis=0), SR, TURNS, "S0")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_speaker_channels_follow_the_audio_not_the_names():
    """``channel_turns`` names speakers by first appearance: when the right channel speaks
    first it is ``S0``. The mapping is read off the chunk's audio, not assumed."""
    from voxtral.diarize.channels import channel_turns
    from voxtral.vad import FRAME_S

    active = np.zeros((125, 2), bool)  # 4 s of 32 ms frames
    active[3:30, 1] = True  # the right channel first
    active[28:65, 0] = True
    active[62:88, 1] = True
    turns = channel_turns(active, bridge_s=0.2)
    assert {t.speaker for t in turns} == {"S0", "S1"}
    assert turns[0].speaker == "S0" and turns[0].start_s == pytest.approx(3 * FRAME_S)
    # the chunk's audio: each channel carries a tone where it is active, the other bleeds in
    frames = np.minimum(np.arange(N) * (1 / SR) // FRAME_S, len(active) - 1).astype(int)
    left, right = _tone(300) * active[frames, 0], _tone(1100) * active[frames, 1]
    wav = np.stack([left + 0.05 * right, right + 0.05 * left])
    assert infer_channel_of(wav, SR, turns) == {"S0": 1, "S1": 0}
    model, user = split_tracks(wav, SR, turns, "S0")
    np.testing.assert_array_equal(model, wav[1])
    np.testing.assert_array_equal(user, wav[0])
    # a chunk where only one of them speaks still finds its channel
    only = [t for t in turns if t.speaker == "S1"]
    assert infer_channel_of(wav, SR, only) == {"S1": 0}


def test_main_speakers_by_speech_time():
    turns = [
        {"start_s": 0.0, "end_s": 1.0, "speaker": "A"},
        {"start_s": 1.0, "end_s": 2.5, "speaker": "B"},
        {"start_s": 2.5, "end_s": 4.0, "speaker": "B"},
        {"start_s": 4.0, "end_s": 6.0, "speaker": "C"},
        {"start_s": 6.0, "end_s": 6.0, "speaker": "D"},  # no time: never a main speaker
    ]
    assert main_speakers(turns) == ["B", "C"]
    assert main_speakers(turns, k=1) == ["B"]
    assert main_speakers(turns, k=9) == ["B", "C", "A"]
    assert main_speakers([]) == []
    tie = [{"start_s": 0, "end_s": 1, "speaker": s} for s in ("S2", "S1", "S3")]
    assert main_speakers(tie) == ["S1", "S2"] == main_speakers(tie[::-1])


def test_words_of_keeps_only_the_model_speakers_words():
    words = [
        {"word": "hi", "start_s": 0.1, "end_s": 0.3, "speaker": "S0"},
        {"word": "hey", "start_s": 0.9, "end_s": 1.1, "speaker": "S1"},
        {"word": "so", "start_s": 2.0, "end_s": 2.2, "speaker": "S0"},
        {"word": "um", "start_s": 3.7, "end_s": 3.8, "speaker": None},
    ]
    assert [w["word"] for w in words_of(words, "S0")] == ["hi", "so"]
    assert [w["word"] for w in words_of(words, "S1")] == ["hey"]
    assert words_of(words, "S2") == [] and words_of(None, "S0") == []


def test_duplex_examples_one_per_main_speaker(voices):
    _, _, mix = voices
    words = [
        {"word": "hi", "start_s": 0.2, "end_s": 0.4, "speaker": "S0"},
        {"word": "hey", "start_s": 1.2, "end_s": 1.4, "speaker": "S1"},
    ]
    got = list(duplex_examples(mix, SR, TURNS, words, fade_s=FADE_S))
    assert [e.model_speaker for e in got] == ["S1", "S0"]  # S1 speaks 1.8 s, S0 1.7 s
    for e in got:
        assert isinstance(e, DuplexExample)
        m, u = split_tracks(mix, SR, TURNS, e.model_speaker, fade_s=FADE_S)
        np.testing.assert_array_equal(e.model_track, m)
        np.testing.assert_array_equal(e.user_track, u)
        assert [w["speaker"] for w in e.words] == [e.model_speaker]
    # one speaker: one example, its user track what lies outside its turns (the background)
    solo = [t for t in TURNS if t["speaker"] == "S0"]
    (e,) = duplex_examples(mix, SR, solo, words)
    assert e.model_speaker == "S0" and [w["word"] for w in e.words] == ["hi"]
    np.testing.assert_allclose(e.model_track + e.user_track, mix, atol=1e-6)
    assert not e.user_track[_mask(solo)].any()
    assert list(duplex_examples(mix, SR, solo, words, min_speakers=2)) == []
    # no turns (diarisation off, failed, no speech): nobody to be the model
    assert list(duplex_examples(mix, SR, [], words)) == []
    # a channel-split chunk: the exact channels, the mapping read once
    wav = np.stack([mix * _mask(TURNS, "S1"), mix * _mask(TURNS, "S0")])
    got = {e.model_speaker: e for e in duplex_examples(wav, SR, TURNS, words, channels=2)}
    np.testing.assert_array_equal(got["S0"].model_track, wav[1])
    np.testing.assert_array_equal(got["S0"].user_track, wav[0])
    np.testing.assert_array_equal(got["S1"].model_track, wav[0])


SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def test_real_dialogue_split_against_its_rttm():
    """``interview_en.mp3`` is hard-panned (the Interviewer left, the Author right): on the
    stereo source each speaker's channel is found from the RTTM turns and its energy lies in
    that speaker's turns; on the mono mix the Interviewer's track holds little of the
    Author (only what the overlaps let through)."""
    from voxtral.diarize.turns import read_rttm
    from voxtral.media import decode_stream

    sr = 16000
    wav = np.concatenate(list(decode_stream(str(SAMPLE / "interview_en.mp3"), sr, stereo=True)),
                         axis=1)  # fmt: skip
    turns = read_rttm(str(SAMPLE / "interview_en.rttm"))
    assert wav.shape[0] == 2 and set(main_speakers(turns)) == {"Interviewer", "Author"}
    assert infer_channel_of(wav, sr, turns) == {"Interviewer": 0, "Author": 1}
    n = wav.shape[1]
    examples = {e.model_speaker: e for e in duplex_examples(wav, sr, turns, channels=2)}
    for who, e in examples.items():
        own = [{"start_s": t.start_s, "end_s": t.end_s, "speaker": t.speaker} for t in turns
               if t.speaker == who]  # fmt: skip
        inside = _mask(own, pad_s=0.1, n=n, sr=sr)
        energy = np.square(e.model_track, dtype=np.float64)
        assert energy[inside].sum() / energy.sum() > 0.95, who
    mono = wav.mean(axis=0)
    model, _ = split_tracks(mono, sr, turns, "Interviewer")
    g = speaker_gains(turns, "Interviewer", n, sr)
    author_leak = np.sum((wav[1] / 2 * g) ** 2) / np.sum(model.astype(np.float64) ** 2)
    assert author_leak < 0.2
    kept = np.sum((wav[0] * g) ** 2) / np.sum(wav[0].astype(np.float64) ** 2)
    assert kept > 0.95  # the Interviewer's own voice is in its track, all but the fringes
