"""Training on two-stream (full-duplex) token rows, without Ray: windows, targets, the
per-stream loss, the refusal of single-stream rows, and the sample's given user track.

The Ray Train runs themselves are two-stream in tests/test_train.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxtral.config import DEFAULT_CONFIG, ConfigError, load_config
from voxtral.interleave import decode_duplex_ids, decode_ids, encode_ids
from voxtral.layout import Layout, Vocab
from voxtral.schema import codes_to_bytes
from voxtral.stages.train.data import (
    AUDIO_Q0,
    AUDIO_REST,
    IGNORE,
    NO_STREAM,
    STREAMS,
    TEXT_PAD,
    USER_AUDIO,
    row_windows,
    window_from_bytes,
    window_targets,
    windows_batch,
)
from voxtral.stages.train.loss import stats_metrics, stream_loss, stream_weights
from voxtral.stages.train.sample import generate_ids, user_continuation
from voxtral.stages.train.token_check import TokenMismatchError

N_Q, K, FPG = 2, 16, 3


def layout_of(streams: int, model_first: bool = True) -> Layout:
    return Layout(
        Vocab(40, N_Q, K), 75.0, FPG, text=True, codec="encodec", streams=streams,
        model_first=model_first,
    )  # fmt: skip


def tracks(frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A model track and a different user track, ``[n_q, frames]`` each."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, K, (N_Q, frames)), rng.integers(0, K, (N_Q, frames))


def token_batch(layout: Layout, rows: list[dict]) -> dict:
    """TOKENS rows as ``map_batches`` hands them over (numpy format, object columns)."""
    keys = ["chunk_id", "codec", "n_q", "frames", "codes", "text_ids", "text_starts_s"]
    if any("user_codes" in r for r in rows):
        keys.append("user_codes")
    return {k: np.array([r.get(k) for r in rows], dtype=object) for k in keys}


def row(chunk_id: str, model: np.ndarray, user: np.ndarray | None) -> dict:
    r = dict(
        chunk_id=chunk_id,
        codec="encodec",
        n_q=N_Q,
        frames=model.shape[1],
        codes=codes_to_bytes(model),
        text_ids=[3, 4, 5],
        text_starts_s=[0.0, 0.1, 0.5],
    )
    if user is not None:
        r["user_codes"] = codes_to_bytes(user)
    return r


@pytest.mark.parametrize("model_first", [True, False])
def test_two_stream_windows_round_trip_both_tracks(model_first):
    layout = layout_of(2, model_first)
    model, user = tracks(60 * FPG)
    seq_len = layout.seq_len_for_groups(25)
    wins = row_windows(layout, model, [3, 4], [0.0, 0.2], seq_len, user_codes=user)
    assert len(wins) == 3 and all(len(w) <= seq_len for w in wins)
    got = [decode_duplex_ids(layout, w) for w in wins]
    assert np.array_equal(np.concatenate([g.model for g in got], axis=1), model)
    assert np.array_equal(np.concatenate([g.user for g in got], axis=1), user)
    assert sum(len(g.text) for g in got) == 2


def test_windows_batch_reads_user_codes_and_one_stream_ignores_them():
    model, user = tracks(20 * FPG)
    two, one = layout_of(2), layout_of(1)
    batch = token_batch(two, [row("a-000", model, user)])
    (w2,) = windows_batch(batch, two, two.seq_len_for_groups(40))["window"]
    dec = decode_duplex_ids(two, window_from_bytes(w2))
    assert np.array_equal(dec.model, model) and np.array_equal(dec.user, user)
    # 1 stream: the same row trains as before, user_codes or not
    expected = encode_ids(one, model, np.array([3, 4, 5]), np.array([0.0, 0.1, 0.5]))
    for rows in ([row("a-000", model, user)], [row("a-000", model, None)]):
        (w1,) = windows_batch(token_batch(one, rows), one, one.seq_len_for_groups(40))["window"]
        assert np.array_equal(window_from_bytes(w1), expected)
        assert np.array_equal(decode_ids(one, window_from_bytes(w1))[0], model)


def test_two_stream_layout_refuses_rows_without_user_codes():
    two = layout_of(2)
    model, user = tracks(10 * FPG)
    rows = [row("ok-000", model, user), row("vidX-003", model, None)]
    with pytest.raises(TokenMismatchError, match=r"vidX-003.*tokenizer\.streams=2"):
        windows_batch(token_batch(two, rows), two, two.seq_len_for_groups(40))
    # and a batch read from a folder without the column at all
    with pytest.raises(TokenMismatchError, match="no user_codes"):
        windows_batch(token_batch(two, rows[1:]), two, two.seq_len_for_groups(40))


def test_window_targets_give_user_slots_their_own_stream():
    layout = layout_of(2)
    model, user = tracks(4 * FPG)
    w = encode_ids(layout, model, user_codes=user)
    labels, streams = window_targets(layout, w)
    assert np.array_equal(labels[:-1], w[1:]) and labels[-1] == IGNORE
    assert streams[-1] == NO_STREAM
    for t in range(len(w) - 1):
        slot = layout.slot_at(t + 1)  # position t predicts the id at t + 1
        if slot.kind == "text":
            assert streams[t] == TEXT_PAD  # no text given: all pads
        elif slot.stream == "user":
            assert streams[t] == USER_AUDIO
        else:
            assert streams[t] == (AUDIO_Q0 if slot.q == 0 else AUDIO_REST)
    per_group = FPG * N_Q
    assert (streams == USER_AUDIO).sum() == 4 * per_group
    assert (streams == AUDIO_Q0).sum() + (streams == AUDIO_REST).sum() == 4 * per_group
    # one stream: no user audio at all
    one = layout_of(1)
    assert not (window_targets(one, encode_ids(one, model))[1] == USER_AUDIO).any()


def test_user_audio_is_reported_but_not_trained_at_weight_zero():
    layout = layout_of(2)
    model, user = tracks(3 * FPG)
    w = encode_ids(layout, model, user_codes=user)
    labels, streams = window_targets(layout, w)
    cfg = load_config(DEFAULT_CONFIG, env={}).train
    weights = stream_weights(cfg)
    assert len(weights) == len(STREAMS) and weights[USER_AUDIO] == 0.0
    torch.manual_seed(0)
    logits = torch.randn(1, len(w), layout.vocab.padded_size, requires_grad=True)
    lab, st = torch.as_tensor(labels)[None], torch.as_tensor(streams)[None]
    loss, stats = stream_loss(logits, lab, st, weights)
    loss.backward()
    user_rows = torch.as_tensor(streams == USER_AUDIO)
    assert logits.grad[0, user_rows].abs().max() == 0  # no gradient from the user's audio
    assert logits.grad[0, ~user_rows].abs().max() > 0
    m = stats_metrics(stats, weights)
    assert np.isfinite(m["loss_user_audio"]) and m["loss_user_audio"] > 0  # still measured
    # the loss is the model's streams alone: unchanged if the user's targets change
    lab2 = lab.clone()
    lab2[0, user_rows] = torch.as_tensor(labels[streams == USER_AUDIO][::-1].copy())
    assert torch.isclose(stream_loss(logits, lab2, st, weights)[0], loss)
    # with a weight, the user's audio trains
    heavy = weights.clone()
    heavy[USER_AUDIO] = 0.1
    logits.grad = None
    stream_loss(logits, lab, st, heavy)[0].backward()
    assert logits.grad[0, user_rows].abs().max() > 0
    assert stats_metrics(stats, weights, prefix="eval_").keys() >= {"eval_loss_user_audio"}


def test_loss_weight_config():
    cfg = load_config(DEFAULT_CONFIG, ["train.loss_weight_user_audio=0.05"], env={})
    assert stream_weights(cfg.train)[USER_AUDIO] == pytest.approx(0.05)
    zero = [f"train.loss_weight_{s}=0" for s in ("text", "text_pad", "audio_q0", "audio_rest")]
    with pytest.raises(ConfigError, match="loss_weight"):
        load_config(DEFAULT_CONFIG, zero, env={})
    # the user's audio alone is no training target
    with pytest.raises(ConfigError, match="loss_weight"):
        load_config(DEFAULT_CONFIG, [*zero, "train.loss_weight_user_audio=1"], env={})


def test_user_continuation_replays_the_user_track_then_silence():
    layout = layout_of(2)
    model, user = tracks(6 * FPG)
    stream = encode_ids(layout, model, user_codes=user)
    start = layout.seq_len_for_groups(2)
    n = 8 * layout.group_len  # 4 groups from the chunk, then 4 of silence
    silence = np.array([7, 9])
    given = user_continuation(layout, stream, start, n, silence)
    sampled = np.array([layout.is_sampled(start + i) for i in range(n)])
    assert (given[sampled] == -1).all() and (given[~sampled] >= 0).all()
    ids = np.concatenate([stream[:start], np.where(sampled, stream[-1], given)])
    dec = decode_duplex_ids(layout, ids)
    assert np.array_equal(dec.user[:, : 6 * FPG], user)
    assert (dec.user[:, 6 * FPG :] == silence[:, None]).all()


class ConstantLM(torch.nn.Module):
    """Uniform logits: enough to drive :func:`generate_ids` without a real model."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.p
        return type("Out", (), {"logits": logits})()


def test_generate_samples_only_the_model_slots(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "DynamicCache", lambda: None)
    layout = layout_of(2)
    model, user = tracks(6 * FPG)
    stream = encode_ids(layout, model, user_codes=user)
    start = layout.seq_len_for_groups(1)
    n = 3 * layout.group_len
    lm = ConstantLM(layout.vocab.padded_size)
    given = user_continuation(layout, stream, start, n, np.zeros(N_Q, dtype=np.int64))
    new = generate_ids(lm, layout, stream[:start], n, given=given)
    assert all(layout.is_allowed(start + i, int(t)) for i, t in enumerate(new))
    user_pos = np.array([not layout.is_sampled(start + i) for i in range(n)])
    assert np.array_equal(new[user_pos], stream[start : start + n][user_pos])
    with pytest.raises(ValueError, match="not sampled"):
        generate_ids(lm, layout, stream[:start], n)
