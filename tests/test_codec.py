"""Codecs (random init, the tests' and offline demo's path): shapes, ranges, encode → decode
of a real speech clip, bad input, and local checkpoints; the codec record (stored form,
compatibility, the tokens record, ``voxtral.json`` old and new)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _speech import assert_same_codes, codec, speech_clip

from voxtral import schema
from voxtral.audio import prepare
from voxtral.codec import (
    CodecInfo,
    CodecMismatchError,
    EncodecCodec,
    check_codec_compatible,
    codec_info,
    ensure_codec_record,
    load_codec,
    model_codec,
    read_codec_record,
)
from voxtral.config import CodecConfig, TokenizerConfig
from voxtral.layout import make_layout
from voxtral.model import read_voxtral_json, save_voxtral_json
from voxtral.storage import Storage

EXPECTED = {
    # name: (n_q, codebook_size, sample_rate, frame_rate, hop)
    "encodec": (2, 1024, 24_000, 75.0, 320),
    "mimi": (8, 2048, 24_000, 12.5, 1920),
}
SIZES = ["full", "tiny"]  # codec.size: the same numbers, fewer parameters


@pytest.fixture(scope="module", params=[(n, size) for n in sorted(EXPECTED) for size in SIZES])
def any_codec(request):
    return codec(*request.param)


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    """The speech clip at 24 kHz, mono float32 ``[T]``."""
    wav, sr = speech_clip()
    return prepare(wav, sr, 24_000)


@pytest.fixture(scope="module")
def speech_codes(any_codec, speech) -> torch.Tensor:
    return any_codec.encode(speech[None, None])


def test_codec_numbers(any_codec):
    n_q, k, sr, fr, hop = EXPECTED[any_codec.name]
    assert (any_codec.n_q, any_codec.codebook_size) == (n_q, k)
    assert (any_codec.sample_rate, any_codec.frame_rate, any_codec.info.hop) == (sr, fr, hop)
    # the numbers known without building the codec agree with the built one
    size = "tiny" if any_codec.info.weights == "random-tiny" else "full"
    assert codec_info(CodecConfig(name=any_codec.name, size=size)) == any_codec.info
    assert any_codec.device == torch.device("cpu")
    assert not any_codec.training and not any_codec.model.training


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_codec_is_the_same_codec_smaller(name):
    """``codec.size: tiny`` keeps every number of the layout and is its own weights: its
    codes are refused where the full random codec's are expected, and the other way round."""
    full, tiny = codec(name), codec(name, "tiny")
    params = [sum(p.numel() for p in c.parameters()) for c in (full, tiny)]
    assert params[1] < 1_000_000 and params[1] * 15 < params[0]
    assert tiny.info.differences(full.info) == ["weights 'random-tiny' ≠ 'random'"]
    assert full.info.differences(tiny.info) == ["weights 'random' ≠ 'random-tiny'"]
    layout = make_layout(full.info, 512, TokenizerConfig())
    assert tiny.info.differences(CodecInfo.from_layout(layout)) == []
    with pytest.raises(ValueError, match="random init only"):
        CodecConfig(name=name, size="tiny", pretrained=True)


def test_encode_speech(any_codec, speech, speech_codes):
    codes = speech_codes
    n_q, k = any_codec.n_q, any_codec.codebook_size
    frames = math.ceil(speech.shape[0] / any_codec.info.hop)
    assert codes.shape == (1, n_q, frames) == (1, n_q, any_codec.info.frames(speech.shape[0]))
    assert not codes.is_floating_point()
    assert int(codes.min()) >= 0 and int(codes.max()) < k
    # calibrated random codebooks: speech uses many different codes in every codebook
    for q in range(n_q):
        assert len(torch.unique(codes[0, q])) >= 8, f"codebook {q} collapsed"
    assert torch.equal(any_codec.encode(speech[None, None]), codes)  # deterministic
    # silence and speech do not share codes
    silence = any_codec.encode(torch.zeros(1, 1, speech.shape[0]))
    assert not torch.equal(silence, codes)


def test_decode_length_and_rate(any_codec, speech, speech_codes):
    wav = any_codec.decode(speech_codes)
    hop = any_codec.info.hop
    frames = speech_codes.shape[-1]
    assert wav.shape == (1, 1, frames * hop)
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()
    assert float(wav.std()) > 0
    # the decoded clip lasts as long as the input, to within one frame, at the codec's rate
    assert 0 <= wav.shape[-1] - speech.shape[0] < hop
    assert abs(wav.shape[-1] / any_codec.sample_rate - speech.shape[0] / 24_000) < 1 / 12.5


def test_batch(any_codec, speech, speech_codes):
    batch = torch.stack([speech, speech.flip(0) * 0.5])[:, None]
    codes = any_codec.encode(batch)
    assert codes.shape == (2, *speech_codes.shape[1:])
    if any_codec.name == "encodec":  # causal: batching changes float rounding only
        # (its LSTM's matrix products are blocked by batch size: on an AMD EPYC one code of
        # 1,200 flipped, at a near tie)
        got, want = codes[0].numpy(), speech_codes[0].numpy()
        assert_same_codes(any_codec, speech.numpy(), got, want, "batched")
    assert not torch.equal(codes[0], codes[1])
    assert any_codec.decode(codes).shape == (2, 1, codes.shape[-1] * any_codec.info.hop)


def test_input_dtypes_and_stored_codes(any_codec, speech, speech_codes):
    short = speech[:12_000][None, None]
    ref = any_codec.encode(short)
    assert torch.equal(any_codec.encode(short.double()), ref)  # cast to the codec's dtype
    # codes as stored in tokens/ (int16) decode like int64 ones
    wav = any_codec.decode(ref)
    assert torch.equal(any_codec.decode(ref.to(torch.int16)), wav)
    # fewer codebooks than n_q still decode (coarser audio, same length)
    assert any_codec.decode(ref[:, :1]).shape == wav.shape


@pytest.mark.parametrize("shape", [(24_000,), (1, 24_000), (1, 2, 24_000), (1, 1, 1, 24_000)])
def test_encode_rejects_wrong_shape(any_codec, shape):
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        any_codec.encode(torch.zeros(shape))


def test_encode_rejects_integer_audio(any_codec):
    with pytest.raises(ValueError, match="float audio"):
        any_codec.encode(torch.zeros(1, 1, 2400, dtype=torch.int16))


def test_decode_rejects_bad_codes(any_codec, speech_codes):
    codes = speech_codes[..., :5]
    with pytest.raises(ValueError, match="codes must be"):
        any_codec.decode(codes[0])  # no batch axis
    with pytest.raises(ValueError, match="codes must be"):
        any_codec.decode(torch.cat([codes, codes], dim=1))  # more codebooks than n_q
    with pytest.raises(ValueError, match=r"codes must lie in \[0, "):
        any_codec.decode(codes + any_codec.codebook_size)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, "):
        any_codec.decode(codes - 1000)
    with pytest.raises(ValueError, match="integers"):
        any_codec.decode(codes.float())


def test_unknown_codec_name():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="name"):
        CodecConfig(name="soundstream")
    bad = CodecConfig.model_construct(name="soundstream", bandwidth=1.5, n_q=None)
    with pytest.raises(ValueError, match="unknown codec 'soundstream'"):
        load_codec(bad)
    with pytest.raises(ValueError, match="unknown codec 'soundstream'"):
        codec_info(bad)


def test_bad_bandwidth_or_n_q():
    with pytest.raises(ValueError, match="codec.bandwidth 2.0 is not an EnCodec bandwidth"):
        EncodecCodec(2.0, None, False)
    with pytest.raises(ValueError, match="codec.n_q 4 does not match"):
        EncodecCodec(1.5, 4, False)
    with pytest.raises(ValueError, match="codec.bandwidth"):
        codec_info(CodecConfig.model_construct(name="encodec", bandwidth=2.0, n_q=None))
    for bw, n_q in [(3.0, 4), (6.0, 8), (24.0, 32)]:
        assert codec_info(CodecConfig(bandwidth=bw)).n_q == n_q


@pytest.mark.parametrize("name", ["encodec", "mimi"])
def test_missing_pretrained_path(tmp_path, name):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="codec checkpoint not found"):
        load_codec(CodecConfig(name=name, pretrained=str(missing)))


def test_random_init_is_the_same_in_every_process(speech):
    """Preprocess and serve build their codecs in different processes: random init must not
    depend on (nor disturb) the global RNG, or their codes would mean different sounds."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    fresh = load_codec(CodecConfig(name="encodec"))
    assert torch.equal(torch.get_rng_state(), state)
    clip = speech[None, None, :48_000]
    assert torch.equal(fresh.encode(clip), codec("encodec").encode(clip))


def test_local_checkpoint(tmp_path, speech):
    """``pretrained: <path>`` loads that state dict (here: the random codec with its decoder's
    output bias shifted, so loading visibly changes the audio and keeps the codes)."""
    from safetensors.torch import save_file

    ref = codec("encodec")
    state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    last = [k for k in state if k.startswith("decoder.") and k.endswith(".bias")][-1]
    assert last == "decoder.model.15.conv.conv.bias"  # the output conv: adds to every sample
    state[last] += 0.25
    path = tmp_path / "encodec.safetensors"
    save_file(state, path)
    loaded = load_codec(CodecConfig(name="encodec", pretrained=str(path)))
    clip = speech[None, None, :24_000]
    codes = loaded.encode(clip)
    assert torch.equal(codes, ref.encode(clip))
    diff = (loaded.decode(codes) - ref.decode(codes)).abs().mean()
    assert float(diff) == pytest.approx(0.25, rel=1e-3)


def test_checkpoint_formats(tmp_path):
    """A local checkpoint may be a torch ``.pt`` file or ``.safetensors``: same tensors."""
    from safetensors.torch import save_file

    from voxtral.codec.models import _load_state_dict

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    torch.save(state, tmp_path / "c.pt")
    save_file(state, tmp_path / "c.safetensors")
    for name in ("c.pt", "c.safetensors"):
        back = _load_state_dict(str(tmp_path / name))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


# -- the codec record ----------------------------------------------------------------------
RECORD_CONFIGS = [
    CodecConfig(name="encodec"),
    CodecConfig(name="encodec", bandwidth=6.0, pretrained=True),
    CodecConfig(name="mimi", n_q=4, pretrained="/ckpt/mimi.safetensors"),
    CodecConfig(name="mimi"),
    CodecConfig(name="mimi", n_q=2, size="tiny"),
    CodecConfig(name="encodec", size="tiny"),
]


@pytest.mark.parametrize("cfg", RECORD_CONFIGS, ids=lambda c: f"{c.name}-{c.pretrained}-{c.size}")
def test_record_round_trips_through_its_stored_form(cfg):
    record = codec_info(cfg)
    stored = json.loads(json.dumps(record.to_dict()))  # as tokens/_codec.json holds it
    assert CodecInfo.from_dict(stored) == record
    keys = {"name", "n_q", "codebook_size", "sample_rate", "frame_rate", "weights"}
    assert set(stored) == keys | ({"bandwidth"} if cfg.name == "encodec" else set())
    random = "random-tiny" if cfg.size == "tiny" else "random"
    assert stored["weights"] == {True: "pretrained", False: random}.get(
        cfg.pretrained, cfg.pretrained
    )
    # the config rebuilt from the record builds the same codec with the same weights
    rebuilt = record.to_config()
    assert codec_info(rebuilt) == record
    assert (rebuilt.pretrained, rebuilt.size) == (cfg.pretrained, cfg.size)
    # a later version's extra keys are ignored; a record without its numbers is refused
    assert CodecInfo.from_dict({**stored, "future": 1}) == record
    with pytest.raises(ValueError, match="lacks n_q, frame_rate"):
        CodecInfo.from_dict({k: v for k, v in stored.items() if k not in ("n_q", "frame_rate")})


def test_record_differences_are_named():
    encodec = codec_info(CodecConfig(name="encodec"))
    assert encodec.differences(encodec) == []
    diffs = encodec.differences(codec_info(CodecConfig(name="mimi")))
    assert [d.split()[0] for d in diffs] == ["name", "n_q", "codebook_size", "frame_rate"]
    assert "n_q 2 ≠ 8" in diffs
    pretrained = codec_info(CodecConfig(name="encodec", pretrained=True))
    assert encodec.differences(pretrained) == ["weights 'random' ≠ 'pretrained'"]
    assert encodec.differences(codec_info(CodecConfig(bandwidth=3.0))) == [
        "n_q 2 ≠ 4",
        "bandwidth 1.5 ≠ 3.0",
    ]
    # a layout pins no weights: only the numbers are compared, frame rates to rounding
    layout = make_layout(pretrained, 512, TokenizerConfig())
    assert encodec.differences(CodecInfo.from_layout(layout)) == []
    close = CodecInfo("encodec", 2, 1024, 24_000, 75.0 + 1e-12)
    assert close.differences(CodecInfo("encodec", 2, 1024, 24_000, 75.0)) == []
    # a stored record without weights does not match a config that pins them
    unweighted = CodecInfo.from_dict({k: v for k, v in encodec.to_dict().items() if k != "weights"})
    assert unweighted.differences(encodec) == ["weights None ≠ 'random'"]


def test_model_codec_reads_new_and_legacy_voxtral_json(tmp_path):
    """Exports store the record (``codec``); older ``voxtral.json`` files had a
    ``codec_config`` or nothing, and still give the codec they were trained with."""
    cfg = CodecConfig(name="encodec", bandwidth=3.0, pretrained=True)
    layout = make_layout(codec_info(cfg), 512, TokenizerConfig())
    save_voxtral_json(tmp_path, layout, {"step": 3}, codec=codec_info(cfg))
    meta = read_voxtral_json(tmp_path)
    assert meta["codec"] == codec_info(cfg).to_dict() and "codec_config" not in meta
    assert model_codec(meta, layout) == codec_info(cfg)
    assert model_codec(meta, layout).to_config() == cfg
    # legacy: the config it recorded, when it names the layout's codec
    legacy = {"layout": meta["layout"], "codec_config": cfg.model_dump()}
    assert model_codec(legacy, layout) == codec_info(cfg)
    # legacy without a usable config: from the layout (EnCodec: the bandwidth of its n_q)
    for old in ({}, {"codec_config": {"name": "mimi"}}, {"codec": "encodec"}):
        assert model_codec(old, layout) == codec_info(CodecConfig(bandwidth=3.0))
    mimi = make_layout(codec_info(CodecConfig(name="mimi", n_q=5)), 512, TokenizerConfig())
    assert model_codec({}, mimi).to_config() == CodecConfig(name="mimi", n_q=5)
    odd = make_layout(CodecInfo("encodec", 3, 1024, 24_000, 75.0), 512, TokenizerConfig())
    with pytest.raises(ValueError, match="no EnCodec bandwidth gives 3 codebooks"):
        model_codec({}, odd)
    # a record that cannot have made the layout's codes is refused, not trusted
    wrong = {"codec": codec_info(CodecConfig(bandwidth=6.0)).to_dict()}
    with pytest.raises(CodecMismatchError, match="n_q 8 ≠ 4"):
        model_codec(wrong, layout)


def test_tokens_record_is_written_checked_and_moved(tmp_path):
    storage = Storage(tmp_path / "run")
    cfg = CodecConfig(name="encodec")
    assert read_codec_record(storage) is None
    with pytest.raises(FileNotFoundError, match="run preprocess first"):
        check_codec_compatible(storage, codec_info(cfg))
    assert ensure_codec_record(storage, cfg) == codec_info(cfg)
    assert storage.read_json(schema.CODEC_RECORD) == codec_info(cfg).to_dict()
    with pytest.raises(CodecMismatchError, match=r"made with encodec .* but mimi .*name"):
        ensure_codec_record(storage, CodecConfig(name="mimi"))
    # a legacy tokens/codec.json is read, and moved to the new name by the next run
    storage.write_bytes(schema.LEGACY_CODEC_RECORD, storage.read_bytes(schema.CODEC_RECORD))
    storage.delete(schema.CODEC_RECORD)
    assert read_codec_record(storage) == codec_info(cfg)
    assert ensure_codec_record(storage, cfg) == codec_info(cfg)
    assert storage.listdir("tokens") == ["_codec.json"]
