"""VAD (``voxtral/vad.py``): the threshold rule, and both drivers over real speech: the live
one equals silero's own whole-signal forward pass however the stream is split, the batched
one gives the same answer however it is fed, hears speech and skips digital silence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _scrape_media import SR, sample_speech

from voxtral.audio import resample
from voxtral.vad import FRAME_S, BatchedVAD, LiveVAD, hysteresis, off_threshold


@pytest.fixture(scope="module")
def speech():
    return sample_speech("podcast_en", 30)


def pieces(x: np.ndarray, seed: int, most: int) -> list[np.ndarray]:
    """``x`` split at random points into pieces of 1 to ``most`` samples."""
    rng, out, i = np.random.default_rng(seed), [], 0
    while i < len(x):
        n = int(rng.integers(1, most))
        out.append(x[i : i + n])
        i += n
    return out


def flags_of(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return hysteresis(probs, threshold, off_threshold(threshold))


def in_speech_and_gaps(speech, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames well inside a caption cue, and frames well away from every cue."""
    t = (np.arange(n) + 0.5) * FRAME_S
    inside, gap = np.zeros(n, bool), np.ones(n, bool)
    for a, b in speech.cues:
        inside |= (t > a + 0.1) & (t < b - 0.1)
        gap &= (t < a - 0.15) | (t > b + 0.3)
    return inside, gap


# -- the threshold rule ---------------------------------------------------------------------------


def test_off_threshold_is_015_below_and_never_negative():
    assert off_threshold(0.5) == pytest.approx(0.35)
    assert off_threshold(0.9) == pytest.approx(0.75)
    assert off_threshold(0.1) == 0.0


def test_hysteresis_turns_on_at_on_and_off_below_off():
    p = np.array([0.2, 0.5, 0.4, 0.36, 0.34, 0.49, 0.5, 0.1], np.float32)
    want = [0, 1, 1, 1, 0, 0, 1, 0]
    assert flags_of(p).astype(int).tolist() == want
    # the band between off and on keeps whatever came before, across calls too
    assert hysteresis(np.array([0.4, 0.4]), 0.5, 0.35, state=True).tolist() == [True, True]
    assert hysteresis(np.array([0.4, 0.4]), 0.5, 0.35, state=False).tolist() == [False, False]


def test_hysteresis_streams_the_same_as_whole():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 5000).astype(np.float32)
    whole = flags_of(p)
    got, state = [], False
    for part in pieces(p, 1, 50):
        flags = hysteresis(part, 0.5, 0.35, state)
        state = bool(flags[-1])
        got.append(flags)
    np.testing.assert_array_equal(np.concatenate(got), whole)


# -- LiveVAD ---------------------------------------------------------------------------------------


def test_live_vad_equals_silero_on_the_whole_signal_however_split(speech):
    from silero_vad import load_silero_vad

    x16 = resample(torch.from_numpy(speech.audio), SR, 16000).numpy()
    whole = load_silero_vad(onnx=True).audio_forward(torch.from_numpy(x16), 16000)[0].numpy()
    vad = LiveVAD(16000)
    got = np.concatenate([vad.push(p) for p in pieces(x16, 2, 3000)])
    assert len(got) == len(x16) // 512 and len(whole) == math.ceil(len(x16) / 512)
    np.testing.assert_allclose(got, whole[: len(got)], atol=1e-6)
    # at the wire rate, resampled as it arrives: the same as resampling the whole signal
    vad24 = LiveVAD(SR)
    got24 = np.concatenate([vad24.push(p) for p in pieces(speech.audio, 3, 3000)])
    np.testing.assert_allclose(got24[: len(got)], got, atol=1e-4)


def test_live_vad_hears_speech_not_silence(speech):
    vad = LiveVAD(SR)
    quiet = vad.push(np.zeros(SR, np.float32))
    assert len(quiet) == round(1 / FRAME_S) and quiet.max() < 0.3
    probs = vad.push(speech.audio)
    inside, gap = in_speech_and_gaps(speech, len(probs))
    assert (probs[inside] > 0.5).mean() > 0.85
    assert (probs[gap] < 0.5).mean() > 0.85


# -- BatchedVAD ------------------------------------------------------------------------------------


def test_batched_vad_hears_speech_not_pauses_and_skips_digital_silence(speech):
    x8 = resample(torch.from_numpy(speech.audio), SR, 8000).numpy()
    vad = BatchedVAD(8000, segment_frames=64, batch=4)
    probs = np.concatenate([vad.push(p) for p in pieces(x8, 4, 7000)] + [vad.flush()])
    assert len(probs) == math.ceil(len(x8) / 256)
    inside, gap = in_speech_and_gaps(speech, len(probs))
    assert (probs[inside] > 0.5).mean() > 0.85
    assert (probs[gap] < 0.5).mean() > 0.85
    quiet = BatchedVAD(8000, segment_frames=64, batch=4)
    assert not np.concatenate([quiet.push(np.zeros(8000 * 20, np.float32)), quiet.flush()]).any()
    assert quiet.model_frames == 0


def test_batched_vad_streams_the_same_and_agrees_with_live(speech):
    x8 = resample(torch.from_numpy(speech.audio), SR, 8000).numpy()
    one = BatchedVAD(8000, segment_frames=64, batch=4)
    whole = np.concatenate([one.push(x8), one.flush()])
    split = BatchedVAD(8000, segment_frames=64, batch=4)
    got = np.concatenate([split.push(p) for p in pieces(x8, 5, 9000)] + [split.flush()])
    np.testing.assert_array_equal(got, whole)
    # Each segment starts afresh after a short warm-up: the speech flags barely move.
    live = LiveVAD(8000).push(x8)
    assert (flags_of(whole[: len(live)]) == flags_of(live)).mean() > 0.95
