"""The token contract, one test file for its three modules (their Hypothesis strategies are
shared): the vocabulary, group layout and allowed tokens (``voxtral/layout.py``), ids ⇄
codes + text and best-effort decoding of anything (``voxtral/interleave.py``), and encoding
real audio through both codecs (``voxtral/tokenizer.py``)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from _speech import codec, speech_clip
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from voxtral.audio import AudioError
from voxtral.codec import CodecInfo, codec_info
from voxtral.config import CodecConfig, ModelConfig, TokenizerConfig
from voxtral.interleave import StreamDecoder, decode_duplex_ids, decode_ids, encode_ids, place_text
from voxtral.layout import (
    EMBED_MULTIPLE,
    Layout,
    LayoutError,
    Track,
    Vocab,
    make_layout,
    position_tracks,
)
from voxtral.model import load_text_tokenizer, resolve_base
from voxtral.tokenizer import MultimodalTokenizer, timed_text_ids

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INFO = {name: codec_info(CodecConfig(name=name)) for name in ("encodec", "mimi")}
GROUP_MS = {"encodec": 40, "mimi": 80}  # 3 EnCodec frames, 1 Mimi frame


def layout_of(name: str, text: bool = True, lead: float = 0.5, text_size: int = 512) -> Layout:
    cfg = TokenizerConfig(group_ms=GROUP_MS[name], text=text, text_lead_s=lead)
    return make_layout(INFO[name], text_size, cfg)


@st.composite
def layouts(draw, text: bool | None = None, streams: int = 1) -> Layout:
    vocab = Vocab(
        text_size=draw(st.integers(1, 300)),
        n_q=draw(st.integers(1, 4)),
        codebook_size=draw(st.integers(1, 64)),
    )
    return Layout(
        vocab=vocab,
        frame_rate=draw(st.sampled_from([75.0, 12.5, 50.0])),
        frames_per_group=draw(st.integers(1, 4)),
        text=draw(st.booleans()) if text is None else text,
        text_lead_s=draw(st.integers(0, 1000)) / 1000,
        codec="test",
        sample_rate=24_000,
        streams=streams,
        model_first=draw(st.booleans()) if streams == 2 else True,
    )


@st.composite
def layout_and_codes(draw, text: bool | None = None):
    layout = draw(layouts(text))
    frames = draw(st.integers(0, 5 * layout.frames_per_group + 2))
    k = layout.vocab.codebook_size
    flat = draw(
        st.lists(
            st.integers(0, k - 1),
            min_size=frames * layout.vocab.n_q,
            max_size=frames * layout.vocab.n_q,
        )
    )
    return layout, np.asarray(flat, dtype=np.int64).reshape(layout.vocab.n_q, frames)


def slot_key(layout: Layout, index: int):
    slot = layout.slot_at(index)
    return "bos" if slot is None else ("text",) if slot.kind == "text" else ("audio", slot.q)


# -- vocabulary and layout ---------------------------------------------------------------
def test_vocabulary_numbers():
    v = layout_of("encodec").vocab
    assert (v.text_size, v.n_q, v.codebook_size) == (512, 2, 1024)
    assert v.audio_range(0) == (512, 1536) and v.audio_range(1) == (1536, 2560)
    assert (v.text_pad, v.bos, v.eos, v.size) == (2560, 2561, 2562, 2563)
    assert v.padded_size == 2624 and v.padded_size % EMBED_MULTIPLE == 0
    assert v.text_pad != v.eos  # padding never reuses EOS
    m = layout_of("mimi").vocab
    assert m.special_offset == 512 + 8 * 2048 and m.padded_size == 16960


def test_layout_shapes_and_serialisation():
    enc = layout_of("encodec")
    assert enc.frames_per_group == 3 and enc.group_len == 1 + 3 * 2
    assert enc.group_s == pytest.approx(0.04) and enc.tokens_per_s == pytest.approx(175)
    assert [(s.kind, s.frame, s.q) for s in enc.slots[:4]] == [
        ("text", 0, 0),
        ("audio", 0, 0),
        ("audio", 0, 1),
        ("audio", 1, 0),
    ]
    assert enc.seq_len_for_groups(150) == 1051  # 6 s of one EnCodec stream
    assert enc.groups_in(1051) == enc.groups_in(1057) == 150 and enc.groups_in(1) == 0
    assert enc.seconds_in(1051) == pytest.approx(6.0)  # 150 groups of 40 ms
    mimi = layout_of("mimi", text=False)
    assert mimi.group_len == 8 and all(s.kind == "audio" for s in mimi.slots)
    for layout in (enc, mimi):
        d = json.loads(json.dumps(layout.to_dict()))
        assert Layout.from_dict(d) == layout
        assert d["vocab"]["specials"] == {
            "<text_pad>": layout.vocab.text_pad,
            "<bos>": layout.vocab.bos,
            "<eos>": layout.vocab.eos,
        }


@pytest.mark.parametrize(
    ("name", "group_ms", "frames"),
    [
        ("encodec", None, 1),
        ("encodec", 1000 / 75, 1),
        ("encodec", 40, 3),
        ("encodec", 200, 15),
        ("mimi", None, 1),
        ("mimi", 80, 1),
        ("mimi", 160, 2),
    ],
)
def test_whole_frame_groups_accepted(name, group_ms, frames):
    layout = make_layout(INFO[name], 100, TokenizerConfig(group_ms=group_ms))
    assert layout.frames_per_group == frames


@pytest.mark.parametrize(
    ("name", "group_ms"),
    [
        ("encodec", 30),
        ("encodec", 10),
        ("encodec", 41),
        ("mimi", 40),
        ("mimi", 100),
        ("mimi", 0),
        ("encodec", -40),
    ],
)
def test_group_not_whole_frames_rejected(name, group_ms):
    with pytest.raises(LayoutError, match="whole number of frames") as err:
        make_layout(INFO[name], 100, TokenizerConfig(group_ms=group_ms))
    assert f"group_ms={group_ms}" in str(err.value)


def test_layout_needs_a_frame():
    with pytest.raises(LayoutError):
        Layout(Vocab(10, 2, 8), 75.0, frames_per_group=0)


# -- allowed tokens -----------------------------------------------------------------------
@HYP
@given(layouts())
def test_allowed_sets_partition_the_vocabulary_by_slot_kind(layout):
    v = layout.vocab
    assert v.padded_size % EMBED_MULTIPLE == 0 and v.size <= v.padded_size < v.size + 64
    by_kind: dict = {}
    for index in range(2 * layout.group_len + 1):
        mask = layout.allowed_mask(index)
        assert mask.shape == (v.padded_size,) and mask.dtype == torch.bool
        key = slot_key(layout, index)
        if key in by_kind:  # every position of one slot kind allows the same set
            assert torch.equal(by_kind[key], mask)
        by_kind[key] = mask
        ranges = layout.allowed_range(layout.slot_at(index))
        assert int(mask.sum()) == sum(hi - lo for lo, hi in ranges)
    masks = torch.stack(list(by_kind.values()))
    assert int(masks.sum(0).max()) == 1  # disjoint
    covered = masks.any(0)
    expected = torch.zeros(v.padded_size, dtype=torch.bool)
    expected[v.audio_offset : v.special_offset] = True
    expected[v.bos] = True
    if layout.text:  # text ids, <text_pad> and <eos> live in the text slot
        expected[: v.text_size] = expected[v.text_pad] = expected[v.eos] = True
    assert torch.equal(covered, expected)  # every id belongs to exactly one kind
    assert not covered[v.size :].any()  # padding rows are never allowed
    assert set(by_kind) == {"bos", *(("audio", q) for q in range(v.n_q))} | (
        {("text",)} if layout.text else set()
    )
    if layout.text:
        text = by_kind[("text",)]
        assert text[: v.text_size].all() and text[v.text_pad] and text[v.eos]
        assert not text[v.bos]
    assert not layout.is_allowed(1, -1) and not layout.is_allowed(1, v.padded_size)


# -- ids ⇄ codes ---------------------------------------------------------------------------
@HYP
@given(layout_and_codes())
def test_codes_ids_codes_round_trip(case):
    layout, codes = case
    v, fpg = layout.vocab, layout.frames_per_group
    groups = codes.shape[1] // fpg
    ids = encode_ids(layout, codes)
    assert ids.dtype == np.int64 and ids[0] == v.bos
    assert len(ids) == layout.seq_len_for_groups(groups)
    assert all(layout.is_allowed(i, int(t)) for i, t in enumerate(ids))
    back, text = decode_ids(layout, ids)
    np.testing.assert_array_equal(back, codes[:, : groups * fpg])  # trailing frames dropped
    assert text == []
    body = encode_ids(layout, codes, bos=False)
    np.testing.assert_array_equal(body, ids[1:])
    np.testing.assert_array_equal(decode_ids(layout, body, start=1)[0], back)


@HYP
@given(layout_and_codes())
def test_every_group_has_the_same_shape(case):
    """Each group: the text slot (when enabled), then whole frames, frame-major."""
    layout, codes = case
    v, fpg = layout.vocab, layout.frames_per_group
    groups = codes.shape[1] // fpg
    body = encode_ids(layout, codes, bos=False).reshape(groups, layout.group_len)
    col = 0
    if layout.text:
        assert (body[:, 0] == v.text_pad).all()  # no captions: all padding, never EOS
        col = 1
    for f in range(fpg):
        for q in range(v.n_q):
            expected = codes[q, f : groups * fpg : fpg] + v.audio_range(q)[0]
            np.testing.assert_array_equal(body[:, col], expected)
            col += 1
    assert col == layout.group_len


@pytest.mark.parametrize("name", ["encodec", "mimi"])
@pytest.mark.parametrize("text", [True, False])
def test_real_codec_codes_round_trip(name, text):
    """Codes of real speech through each codec's own layout come back exactly."""
    wav, sr = speech_clip()
    tok = MultimodalTokenizer(codec(name), None, layout_of(name, text=text))
    codes = tok.encode_audio(wav, sr)
    assert codes.shape[0] == INFO[name].n_q and codes.shape[1] > 10
    ids = encode_ids(tok.layout, codes)
    back, _ = decode_ids(tok.layout, ids)
    fpg = tok.layout.frames_per_group
    np.testing.assert_array_equal(back, codes[:, : codes.shape[1] // fpg * fpg])


def test_stored_int16_codes_encode_like_int64():
    layout = layout_of("encodec")
    codes = np.random.default_rng(0).integers(0, 1024, (2, 12))
    np.testing.assert_array_equal(
        encode_ids(layout, codes.astype(np.int16)), encode_ids(layout, codes)
    )


def test_encode_ids_rejects_bad_input():
    layout = layout_of("encodec")
    with pytest.raises(LayoutError, match="n_q=2"):
        encode_ids(layout, np.zeros((3, 6), dtype=np.int64))
    with pytest.raises(LayoutError, match="n_q=2"):
        encode_ids(layout, np.zeros(6, dtype=np.int64))
    with pytest.raises(LayoutError, match=r"\[0, 1024\)"):
        encode_ids(layout, np.full((2, 6), 1024))
    with pytest.raises(LayoutError, match=r"\[0, 1024\)"):
        encode_ids(layout, np.full((2, 6), -1))
    with pytest.raises(LayoutError, match=r"text ids must lie in \[0, 512\)"):
        encode_ids(layout, np.zeros((2, 6), dtype=np.int64), np.array([600]), np.array([0.0]))


# -- text placement: text leads audio by text_lead_s ---------------------------------------
@st.composite
def timed_tokens(draw):
    fpg = draw(st.integers(1, 4))
    frame_rate = draw(st.sampled_from([75.0, 12.5]))
    lead_ms = draw(st.integers(0, 1000))
    layout = Layout(Vocab(1000, 1, 4), frame_rate, fpg, text=True, text_lead_s=lead_ms / 1000)
    groups = draw(st.integers(1, 60))
    times_ms = draw(st.lists(st.integers(0, 4000), max_size=40))
    return layout, groups, Fraction(lead_ms, 1000), [Fraction(t, 1000) for t in times_ms]


@HYP
@given(timed_tokens())
def test_text_leads_audio_by_the_configured_time(case):
    layout, groups, lead, times = case
    group_s = Fraction(layout.frames_per_group) / Fraction(layout.frame_rate)
    ids = np.arange(len(times)) + 1  # distinct ids to follow each token
    out = place_text(layout, groups, ids, np.array([float(t) for t in times]))
    assert out.shape == (groups,)
    where = {int(tok): g for g, tok in enumerate(out) if tok != layout.vocab.text_pad}
    order = sorted(range(len(times)), key=lambda i: times[i])  # stable, like the encoder
    placed = [int(ids[i]) for i in order if int(ids[i]) in where]
    assert placed == [int(ids[i]) for i in order][: len(placed)]  # in time order, a prefix
    assert [where[t] for t in placed] == sorted(where.values())
    for i in order:
        target = max(0, math.floor((times[i] - lead) / group_s))  # exact arithmetic
        g = where.get(int(ids[i]))
        if g is None:  # dropped: only when no free slot is left from its target on
            assert all(out[target:] != layout.vocab.text_pad)
            continue
        assert g >= target
        assert all(out[target:g] != layout.vocab.text_pad)  # moved only past taken slots
        if g == target and times[i] >= lead:
            # its group starts text_lead_s (to within a group) before the word
            assert g * group_s <= times[i] - lead < (g + 1) * group_s


def test_text_slot_sits_lead_groups_before_its_audio():
    """In the id stream a word's token comes text_lead_s before the audio frame of the word."""
    layout = layout_of("encodec", lead=0.4)  # 10 groups of 40 ms
    frames = 90  # 1.2 s
    codes = np.zeros((2, frames), dtype=np.int64)
    times = [0.48, 0.6, 1.0, 1.19]
    ids = encode_ids(layout, codes, np.array([5, 6, 7, 8]), np.array(times))
    body = ids[1:].reshape(-1, layout.group_len)
    assert [int(np.flatnonzero(body[:, 0] == t)[0]) for t in (5, 6, 7, 8)] == [2, 5, 15, 19]
    for token, t in zip((5, 6, 7, 8), times, strict=True):
        text_group = int(np.flatnonzero(body[:, 0] == token)[0])
        audio_group = int(t * layout.frame_rate) // layout.frames_per_group
        assert audio_group - text_group == 10  # 0.4 s / 40 ms
    # words before text_lead_s go to the first slots, in order; past the end they are dropped
    early = encode_ids(layout, codes, np.array([1, 2, 3]), np.array([0.1, 0.0, 5.0]))
    assert list(early[1:].reshape(-1, layout.group_len)[:3, 0]) == [2, 1, layout.vocab.text_pad]
    assert 3 not in early[1 :: layout.group_len]


# -- decoding anything ----------------------------------------------------------------------
junk_ids = st.lists(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-5, 3000)), max_size=200
)


@HYP
@given(layouts(), junk_ids, st.integers(0, 40))
def test_decoding_junk_never_crashes(layout, ids, start):
    v = layout.vocab
    codes, text = decode_ids(layout, ids, start=start)
    positions = range(start, start + len(ids))
    complete = sum(
        1
        for p in positions
        if (s := layout.slot_at(p)) is not None and s.kind == "audio" and s.q == v.n_q - 1
    )
    assert codes.dtype == np.int64 and codes.shape == (v.n_q, complete)
    assert codes.size == 0 or (codes.min() >= 0 and codes.max() < v.codebook_size)
    assert all(0 <= t < v.text_size for t in text)
    dec = StreamDecoder(layout, index=start)
    dec.push(ids)
    bad = [t for p, t in zip(positions, ids, strict=True) if not layout.is_allowed(p, t)]
    assert dec.dropped == len(bad)
    assert dec.index == start + len(ids)


def test_wrong_slot_tokens_are_dropped_and_audio_keeps_its_timing():
    layout = layout_of("encodec")  # slots: text, f0q0 f0q1 f1q0 f1q1 f2q0 f2q1
    v = layout.vocab
    codes = np.arange(12).reshape(2, 6) + 100
    ids = encode_ids(layout, codes)
    ids[1] = v.eos  # allowed in a text slot, not text: no transcript
    ids[2] = v.audio_range(1)[0] + 7  # codebook 1's token in codebook 0's slot
    ids[5] = 99_999  # out of vocabulary
    ids[9] = v.text_pad  # padding in an audio slot (f3q0; ids[8] is a text slot)
    dec = StreamDecoder(layout, index=0)
    back, text = dec.push(ids)
    assert dec.dropped == 3 and text == []
    expected = codes.copy()
    expected[0, 0] = 0  # nothing before it: code 0
    expected[1, 1] = expected[1, 0]  # repeats the previous frame's code
    expected[0, 3] = expected[0, 2]
    np.testing.assert_array_equal(back, expected)


def test_partial_frame_is_held_back():
    layout = layout_of("encodec")
    codes = np.arange(12).reshape(2, 6)
    ids = encode_ids(layout, codes, np.array([42]), np.array([0.0]))
    dec = StreamDecoder(layout, index=0)
    a, text = dec.push(ids[:3])  # <bos>, text, f0q0: frame 0 incomplete
    assert a.shape == (2, 0) and text == [42]
    b, _ = dec.push(ids[3:6])  # f0q1 completes frame 0; f1q0 f1q1 frame 1
    np.testing.assert_array_equal(b, codes[:, :2])
    c, _ = dec.push(ids[6:])
    np.testing.assert_array_equal(np.concatenate([a, b, c], axis=1), codes)
    assert dec.push([])[0].shape == (2, 0)


@HYP
@given(layouts(), junk_ids, st.lists(st.integers(0, 200), max_size=6))
def test_stream_decoder_incremental_equals_one_shot(layout, ids, cuts):
    one_codes, one_text = decode_ids(layout, ids)
    dec = StreamDecoder(layout, index=0)
    parts, text = [], []
    bounds = [0, *sorted(c for c in cuts if c <= len(ids)), len(ids)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        c, t = dec.push(ids[lo:hi])
        parts.append(c)
        text += t
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), one_codes)
    assert text == one_text


@HYP
@given(layout_and_codes(text=True), st.lists(st.integers(0, 300), max_size=6))
def test_stream_decoder_on_valid_streams(case, cuts):
    layout, codes = case
    assume(codes.shape[1] >= layout.frames_per_group)
    v = layout.vocab
    n = codes.shape[1] // layout.frames_per_group
    text_ids = np.arange(n) % v.text_size
    ids = encode_ids(layout, codes, text_ids, np.arange(n) * layout.group_s + layout.text_lead_s)
    dec = StreamDecoder(layout, index=0)
    bounds = [0, *sorted(c for c in cuts if c <= len(ids)), len(ids)]
    got = [dec.push(ids[lo:hi]) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    np.testing.assert_array_equal(
        np.concatenate([g[0] for g in got], axis=1), codes[:, : n * layout.frames_per_group]
    )
    assert [t for g in got for t in g[1]] == list(text_ids)
    assert dec.dropped == 0


# -- text -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_tok():
    return load_text_tokenizer(resolve_base(ModelConfig(base="tiny")))


def test_timed_text_ids_maps_tokens_to_their_words(text_tok):
    sentence = "so what do you think about xylophones, honestly? it is a really good question"
    words = [{"word": w, "start_s": 0.25 * i + 0.1} for i, w in enumerate(sentence.split())]
    ids, starts = timed_text_ids(text_tok, words)
    assert len(ids) == len(starts) > len(words)  # some words take several tokens
    assert starts == sorted(starts)
    for w in words:
        mine = [i for i, s in zip(ids, starts, strict=True) if s == w["start_s"]]
        assert text_tok.decode(mine).strip() == w["word"]
    assert text_tok.decode(ids).strip() == sentence
    assert timed_text_ids(text_tok, []) == ([], [])


def test_timed_text_ids_orders_words_and_drops_blank_ones(text_tok):
    assert timed_text_ids(text_tok, None) == ([], [])
    words = [
        {"word": "week", "start_s": 1.5, "end_s": 1.8},
        {"word": "last", "start_s": 1.0, "end_s": 1.4},
        {"word": "  ", "start_s": 0.5, "end_s": 0.6},
    ]
    ids, starts = timed_text_ids(text_tok, words)
    assert starts == sorted(starts) and starts[0] == 1.0
    assert text_tok.decode(ids).split() == ["last", "week"]


# -- the whole tokenizer on audio ---------------------------------------------------------
@pytest.fixture(scope="module", params=["encodec", "mimi"])
def mm(request, text_tok):
    name = request.param
    return MultimodalTokenizer(codec(name), text_tok, layout_of(name, lead=0.2))


def test_encode_decode_speech_with_words(mm):
    wav, sr = speech_clip()
    words = [{"word": "welcome", "start_s": 0.3}, {"word": "back", "start_s": 0.8}]
    ids = mm.encode(wav, sr, words)
    layout = mm.layout
    frames = mm.codec.info.frames(round(len(wav) * mm.codec.sample_rate / sr))  # after resampling
    groups = frames // layout.frames_per_group
    assert len(ids) == layout.seq_len_for_groups(groups)
    assert all(layout.is_allowed(i, int(t)) for i, t in enumerate(ids))
    audio, transcript = mm.decode(ids)
    assert transcript.split() == ["welcome", "back"]
    assert audio.dtype == np.float32
    assert audio.shape == (groups * layout.frames_per_group * mm.codec.info.hop,)
    duration = len(wav) / sr
    assert duration - layout.group_s - 0.1 < len(audio) / mm.codec.sample_rate < duration + 0.1
    # junk decodes best effort, never a crash
    junk = np.random.default_rng(1).integers(-10, layout.vocab.padded_size + 10, 100)
    audio, _ = mm.decode(junk, start=0)
    last_q = [layout.slot_at(i) for i in range(1, 100)]
    frames = sum(1 for s in last_q if s.kind == "audio" and s.q == layout.vocab.n_q - 1)
    assert audio.shape == (frames * mm.codec.info.hop,)
    assert mm.decode([layout.vocab.bos, 5])[0].shape == (0,)  # no complete frame: no audio


def test_encode_takes_any_rate_channels_and_pcm(mm):
    wav, sr = speech_clip()
    wav = np.clip(wav[:sr], -32767, 32767)  # one second; -wav must not overflow int16
    mono = mm.encode_audio(wav, sr)
    np.testing.assert_array_equal(mm.encode_audio(wav.astype(np.float32) / 32768, sr), mono)
    np.testing.assert_array_equal(mm.encode_audio(np.stack([wav, wav]), sr), mono)
    silence = mm.encode_audio(np.zeros_like(wav), sr)
    np.testing.assert_array_equal(mm.encode_audio(np.stack([wav, -wav]), sr), silence)
    at_48k = mm.encode_audio(torch.zeros(2, 48_000), 48_000)
    assert at_48k.shape == mm.encode_audio(np.zeros(24_000, np.float32), 24_000).shape


@pytest.mark.parametrize(
    ("audio", "match"),
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((2, 0), np.float32), "empty"),
        (np.full(2400, np.nan, np.float32), "NaN"),
        (np.array([0.0, np.inf] * 1200, np.float32), "NaN or infinite"),
        (np.zeros(2400, bool), "real PCM"),
        (np.zeros(2400, np.complex64), "real PCM"),
        (np.array(["a"] * 2400), "real PCM"),
        (np.zeros((1, 2, 2400), np.float32), r"\[T\] or \[C, T\]"),
    ],
)
def test_bad_audio_is_rejected(text_tok, audio, match):
    mm = MultimodalTokenizer(codec("encodec"), text_tok, layout_of("encodec"))
    with pytest.raises(AudioError, match=match):
        mm.encode(audio, 24_000)


def test_bad_sample_rate_and_uint8(text_tok):
    mm = MultimodalTokenizer(codec("encodec"), text_tok, layout_of("encodec"))
    with pytest.raises(AudioError, match="sample rate"):
        mm.encode(np.zeros(2400, np.float32), 0)
    # 8-bit PCM is unsigned: 128 is silence
    silence = mm.encode_audio(np.zeros(2400, np.float32), 24_000)
    np.testing.assert_array_equal(mm.encode_audio(np.full(2400, 128, np.uint8), 24_000), silence)


def test_codec_and_layout_must_agree(text_tok):
    with pytest.raises(LayoutError, match="layout is for mimi"):
        MultimodalTokenizer(codec("encodec"), text_tok, layout_of("mimi"))
    other = make_layout(CodecInfo("encodec", 4, 1024, 24_000, 75.0), 512, TokenizerConfig())
    with pytest.raises(LayoutError, match="n_q=4"):
        MultimodalTokenizer(codec("encodec"), text_tok, other)


# -- two streams (full duplex) --------------------------------------------------------------
def codes_of(draw, layout: Layout, frames: int) -> np.ndarray:
    n_q, k = layout.vocab.n_q, layout.vocab.codebook_size
    flat = draw(st.lists(st.integers(0, k - 1), min_size=frames * n_q, max_size=frames * n_q))
    return np.asarray(flat, dtype=np.int64).reshape(n_q, frames)


@st.composite
def duplex_cases(draw, text: bool | None = True):
    """A 2-stream layout, both tracks' codes, and text timed one token per chosen group."""
    layout = draw(layouts(text, streams=2))
    frames = draw(st.integers(0, 5 * layout.frames_per_group + 2))
    model, user = codes_of(draw, layout, frames), codes_of(draw, layout, frames)
    groups = frames // layout.frames_per_group
    at = sorted(draw(st.sets(st.integers(0, max(0, groups - 1)), max_size=groups)))
    text_ids = np.asarray(
        [draw(st.integers(0, layout.vocab.text_size - 1)) for _ in at], dtype=np.int64
    )
    starts = np.asarray(at, dtype=np.float64) * layout.group_s + layout.text_lead_s
    return layout, model, user, text_ids, starts


@HYP
@given(duplex_cases(text=None), st.lists(st.integers(0, 300), max_size=6))
def test_two_stream_round_trip(case, cuts):
    layout, model, user, text_ids, starts = case
    whole = model.shape[1] // layout.frames_per_group * layout.frames_per_group
    ids = encode_ids(layout, model, text_ids, starts, user_codes=user)
    groups = whole // layout.frames_per_group
    assert ids[0] == layout.vocab.bos and len(ids) == layout.seq_len_for_groups(groups)
    got = decode_duplex_ids(layout, ids)
    np.testing.assert_array_equal(got.model, model[:, :whole])
    np.testing.assert_array_equal(got.user, user[:, :whole])
    assert got.text == (list(text_ids) if layout.text else [])
    # decode_ids and push keep their 1-stream shape: the model's track and the text
    codes, text = decode_ids(layout, ids)
    np.testing.assert_array_equal(codes, got.model)
    assert text == got.text
    # incremental decoding gives the same, whatever the cuts
    dec = StreamDecoder(layout, index=0)
    bounds = [0, *sorted(c for c in cuts if c <= len(ids)), len(ids)]
    parts = [dec.push_duplex(ids[lo:hi]) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    np.testing.assert_array_equal(np.concatenate([p.model for p in parts], axis=1), got.model)
    np.testing.assert_array_equal(np.concatenate([p.user for p in parts], axis=1), got.user)
    assert [t for p in parts for t in p.text] == got.text and dec.dropped == 0
    body = encode_ids(layout, model, text_ids, starts, bos=False, user_codes=user)
    np.testing.assert_array_equal(body, ids[1:])


@HYP
@given(duplex_cases(text=None))
def test_two_stream_group_order_and_shared_codebooks(case):
    """Text first, then each stream's frames frame-major, the model's first when model_first;
    a user code has the same id as the model's same code (the vocabulary does not grow)."""
    layout, model, user, _, _ = case
    v, fpg = layout.vocab, layout.frames_per_group
    groups = model.shape[1] // fpg
    body = encode_ids(layout, model, bos=False, user_codes=user).reshape(groups, layout.group_len)
    col = int(layout.text)
    order = (model, user) if layout.model_first else (user, model)
    for track in order:
        for f in range(fpg):
            for q in range(v.n_q):
                expected = track[q, f : groups * fpg : fpg] + v.audio_range(q)[0]
                np.testing.assert_array_equal(body[:, col], expected)
                col += 1
    assert col == layout.group_len
    assert v.size == Vocab(v.text_size, v.n_q, v.codebook_size).size


@HYP
@given(duplex_cases(text=None))
def test_two_stream_masks_and_sampled_slots(case):
    layout, model, user, _, _ = case
    v, fpg = layout.vocab, layout.frames_per_group
    ids = encode_ids(layout, model, user_codes=user)
    assert all(layout.is_allowed(i, int(t)) for i, t in enumerate(ids))
    kinds = [(s.kind, s.stream) for s in layout.slots]
    assert kinds.count(("text", "model")) == int(layout.text)
    assert kinds.count(("audio", "model")) == kinds.count(("audio", "user")) == fpg * v.n_q
    assert layout.group_len == int(layout.text) + 2 * fpg * v.n_q
    # model slots are sampled, user slots and <bos> are given; every slot still has a mask
    n = layout.seq_len_for_groups(2)
    sampled = layout.sampled_positions(n)
    assert sampled.dtype == bool and sampled.shape == (n,)
    assert not layout.is_sampled(0) and not sampled[0]
    for i in range(1, n):
        slot = layout.slot_at(i)
        assert layout.is_sampled(i) == sampled[i] == (slot.stream == "model") == slot.sampled
        assert layout.allowed_mask(i).any()
        if slot.kind == "audio":  # both streams allow the same codebook range
            lo, hi = v.audio_range(slot.q)
            assert int(layout.allowed_mask(i).sum()) == hi - lo and layout.allowed_mask(i)[lo]
    assert int(sampled[1:].sum()) == 2 * (int(layout.text) + fpg * v.n_q)
    np.testing.assert_array_equal(layout.sampled_positions(n - 1, start=1), sampled[1:])


@HYP
@given(layouts(streams=2), st.integers(0, 40), st.integers(0, 60))
def test_position_tracks_follow_the_slots(layout, start, n):
    tracks = position_tracks(layout, n, start)
    assert tracks.dtype == np.int8 and tracks.shape == (n,)
    for i, t in zip(range(start, start + n), tracks, strict=True):
        slot = layout.slot_at(i)
        if slot is None:
            assert t == Track.BOS
        elif slot.kind == "text":
            assert t == Track.TEXT
        else:
            assert t == (Track.MODEL_AUDIO if slot.stream == "model" else Track.USER_AUDIO)
    group = position_tracks(layout, layout.group_len, start=1)
    np.testing.assert_array_equal(group, layout.slot_tracks)
    assert np.count_nonzero(group == Track.USER_AUDIO) == layout.frames_per_group * layout.vocab.n_q


def test_one_stream_tracks_have_no_user_audio():
    layout = layout_of("encodec")
    tracks = position_tracks(layout, layout.seq_len_for_groups(3))
    assert list(tracks[:8]) == [-1, 0, 1, 1, 1, 1, 1, 1] and (tracks != Track.USER_AUDIO).all()
    assert layout.sampled_positions(len(tracks))[1:].all()
    assert all(s.stream == "model" and s.sampled for s in layout.slots)


@HYP
@given(layouts(streams=2), junk_ids, st.integers(0, 40))
def test_two_stream_decoding_junk_never_crashes(layout, ids, start):
    v = layout.vocab
    got = decode_duplex_ids(layout, ids, start=start)
    last_q = [layout.slot_at(p) for p in range(start, start + len(ids))]
    for stream, codes in (("model", got.model), ("user", got.user)):
        complete = sum(
            1
            for s in last_q
            if s is not None and s.kind == "audio" and s.stream == stream and s.q == v.n_q - 1
        )
        assert codes.dtype == np.int64 and codes.shape == (v.n_q, complete)
        assert codes.size == 0 or (codes.min() >= 0 and codes.max() < v.codebook_size)
    assert all(0 <= t < v.text_size for t in got.text)


def test_dropped_user_token_repeats_the_users_previous_code():
    layout = Layout(Vocab(10, 2, 8), 75.0, 1, streams=2)  # text, model q0 q1, user q0 q1
    v = layout.vocab
    model, user = np.array([[1, 2], [3, 4]]), np.array([[5, 6], [7, 0]])
    ids = encode_ids(layout, model, user_codes=user)
    ids[1 + 5 + 3] = v.audio_range(1)[0]  # group 1's user q0 slot gets codebook 1's token
    got = decode_duplex_ids(layout, ids)
    np.testing.assert_array_equal(got.model, model)
    np.testing.assert_array_equal(got.user, [[5, 5], [7, 0]])  # the user's 5, not the model's


def test_one_stream_decoding_returns_no_user_frames():
    layout = layout_of("encodec")
    codes = np.arange(12).reshape(2, 6)
    got = decode_duplex_ids(layout, encode_ids(layout, codes))
    np.testing.assert_array_equal(got.model, codes)
    assert got.user.shape == (2, 0) and got.text == []


def test_layout_dicts_old_and_two_stream():
    old = layout_of("encodec").to_dict()
    del old["streams"], old["model_first"]  # a voxtral.json from before full duplex
    loaded = Layout.from_dict(json.loads(json.dumps(old)))
    assert loaded == layout_of("encodec") and (loaded.streams, loaded.model_first) == (1, True)
    for model_first in (True, False):
        cfg = TokenizerConfig(group_ms=40, streams=2, model_first=model_first)
        layout = make_layout(INFO["encodec"], 512, cfg)
        d = json.loads(json.dumps(layout.to_dict()))
        assert (d["streams"], d["model_first"], d["group_len"]) == (2, model_first, 13)
        back = Layout.from_dict(d)
        assert back == layout and back.slots == layout.slots
        assert back != Layout.from_dict({**d, "model_first": not model_first})
    assert Layout.from_dict({**old, "streams": 2}) != loaded


def test_two_stream_encode_errors():
    one = layout_of("encodec")
    two = make_layout(INFO["encodec"], 512, TokenizerConfig(group_ms=40, streams=2))
    codes = np.zeros((2, 6), dtype=np.int64)
    with pytest.raises(LayoutError, match="1 stream"):
        encode_ids(one, codes, user_codes=codes)
    with pytest.raises(LayoutError, match="needs user_codes"):
        encode_ids(two, codes)
    with pytest.raises(LayoutError, match="time-aligned"):
        encode_ids(two, codes, user_codes=np.zeros((2, 9), dtype=np.int64))
    with pytest.raises(LayoutError, match=r"user_codes must be \[n_q=2"):
        encode_ids(two, codes, user_codes=np.zeros((3, 6), dtype=np.int64))
    with pytest.raises(LayoutError, match=r"user_codes must lie in \[0, 1024\)"):
        encode_ids(two, codes, user_codes=np.full((2, 6), 1024))
    with pytest.raises(LayoutError, match="streams must be 1 or 2"):
        Layout(Vocab(10, 2, 8), 75.0, 1, streams=3)
