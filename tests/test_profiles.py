"""The real profile's codec choice (issue 13, item 5: Mimi, two streams)."""

from __future__ import annotations

import re

import numpy as np

from voxtral.codec import codec_info
from voxtral.config import REPO_ROOT, Config, load_config
from voxtral.tokenizer import Layout, decode_duplex_ids, encode_ids, make_layout

REAL = REPO_ROOT / "configs" / "youtube-mistral7b.yaml"
MISTRAL_TEXT = 32_768  # Mistral-7B-v0.3's text vocabulary (it changes no figure here)


def real() -> tuple[Config, Layout]:
    cfg = load_config(REAL, env={})  # offline, no token: what a job checks before any work
    return cfg, make_layout(codec_info(cfg.codec), MISTRAL_TEXT, cfg.tokenizer)


def test_real_profile_is_two_stream_mimi_and_its_lengths_agree():
    cfg, layout = real()
    assert cfg.codec.name == "mimi" and 4 <= cfg.codec.n_q <= 8 and cfg.codec.pretrained is True
    assert cfg.tokenizer.streams == 2 and cfg.diarize.enabled  # duplex rows need speaker turns
    assert (layout.streams, layout.model_first, layout.frames_per_group) == (2, True, 1)
    assert layout.group_len == 1 + 2 * cfg.codec.n_q and layout.group_s == 0.08
    seq_len = cfg.train.seq_len
    cfg.train.check_layout(layout.group_len)  # <bos> + whole groups
    # the longest chunk fits one training window whole: no conversation is cut in two
    samples = round(cfg.scrape.max_chunk_s * layout.sample_rate)
    assert codec_info(cfg.codec).frames(samples) <= layout.groups_in(seq_len)
    # the server never asks for positions the model was not trained on
    assert cfg.serve.max_context_tokens <= seq_len
    # the comment beside train.seq_len says what it holds
    said = re.search(r"seq_len: (\d+) +# 1 \+ (\d+) groups of (\d+) \(([\d.]+) s", REAL.read_text())
    assert said, "configs/youtube-mistral7b.yaml: train.seq_len's comment"
    assert int(said[1]) == seq_len
    assert (int(said[2]), int(said[3])) == (layout.groups_in(seq_len), layout.group_len)
    assert said[4] == f"{layout.seconds_in(seq_len):.1f}"


def test_a_whole_window_of_the_real_layout_round_trips():
    """Both speakers' Mimi codes and timed text fill one train.seq_len window exactly and
    come back; only the model's text slot and codebooks are sampled in each group."""
    cfg, layout = real()
    v, groups = layout.vocab, layout.groups_in(cfg.train.seq_len)
    rng = np.random.default_rng(0)
    model, user = (rng.integers(0, v.codebook_size, (v.n_q, groups)) for _ in range(2))
    starts = np.sort(rng.uniform(0, groups * layout.group_s - 1, 100))
    text = rng.integers(0, MISTRAL_TEXT, len(starts))
    ids = encode_ids(layout, model, text, starts, user_codes=user)
    assert len(ids) == cfg.train.seq_len
    assert all(layout.is_allowed(i, t) for i, t in enumerate(ids.tolist()))
    got = decode_duplex_ids(layout, ids)
    np.testing.assert_array_equal(got.model, model)
    np.testing.assert_array_equal(got.user, user)
    assert got.text == text.tolist()
    assert layout.sampled_positions(len(ids)).sum() == groups * (1 + v.n_q)
