"""The real profile's codec choice (issue 13, item 5: Mimi, two streams) and the README's table
of tokens per second and seconds of context, recomputed from the layout code: a figure typed
by hand, or a layout or profile that changed without the README, fails here."""

from __future__ import annotations

import re

import numpy as np

from voxtral.codec import codec_info
from voxtral.config import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    CodecConfig,
    Config,
    TokenizerConfig,
    load_config,
)
from voxtral.interleave import decode_duplex_ids, encode_ids
from voxtral.layout import Layout, make_layout

REAL = REPO_ROOT / "configs" / "youtube-mistral7b.yaml"
MISTRAL_TEXT = 32_768  # Mistral-7B-v0.3's text vocabulary (it changes no figure here)
TABLE_HEADER = "| codec | `codec.n_q` |"
CHOICES = {  # (codec, n_q, streams) the README's table must give (issue 13, item 5)
    (name, n_q, streams)
    for name, n_q in (("encodec", 2), ("mimi", 4), ("mimi", 8))
    for streams in (1, 2)
}


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


def readme_table() -> tuple[list[str], list[list[str]]]:
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    rows = []
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[at]), rows


def test_readme_tokens_per_second_and_context_come_from_the_layout():
    header, rows = readme_table()
    col = {name: i for i, name in enumerate(header)}
    lengths = {
        i: int(m[1].replace(",", ""))
        for i, name in enumerate(header)
        if (m := re.match(r"seconds in ([\d,]+) tokens", name))
    }
    cfg, real_layout = real()
    assert cfg.train.seq_len in lengths.values()  # the real profile's own window
    seen, profile_rows, local_rows = set(), [], []
    for row in rows:
        n_q = int(row[col["`codec.n_q`"]])
        if row[0].startswith("EnCodec"):
            kbps = float(re.search(r"([\d.]+) kbps", row[0])[1])
            codec = CodecConfig(name="encodec", bandwidth=kbps)
        else:
            assert row[0].startswith("Mimi"), row
            codec = CodecConfig(name="mimi", n_q=n_q)
        tok = TokenizerConfig(
            group_ms=float(row[col["`tokenizer.group_ms`"]]),
            streams=int(row[col["`tokenizer.streams`"]]),
        )
        layout = make_layout(codec_info(codec), MISTRAL_TEXT, tok)
        assert layout.vocab.n_q == n_q, row
        assert row[col["tokens per group"]] == str(layout.group_len), row
        assert row[col["tokens per second"]] == f"{layout.tokens_per_s:g}", row
        for i, seq_len in lengths.items():
            assert row[i] == f"{layout.seconds_in(seq_len):.1f}", (header[i], row)
        seen.add((codec.name, n_q, layout.streams))
        if "youtube-mistral7b" in row[col["profile"]]:
            profile_rows.append(layout)
        if "local.yaml" in row[col["profile"]]:
            local_rows.append(layout)
    assert CHOICES <= seen, CHOICES - seen

    def choice(layout: Layout) -> tuple:
        return layout.codec, layout.vocab.n_q, layout.frames_per_group, layout.streams

    # the row the README gives the real profile is its own
    assert [choice(x) for x in profile_rows] == [choice(real_layout)]
    local = load_config(DEFAULT_CONFIG, env={})
    local_layout = make_layout(codec_info(local.codec), MISTRAL_TEXT, local.tokenizer)
    assert [choice(x) for x in local_rows] == [choice(local_layout)]
