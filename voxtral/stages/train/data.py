"""Token rows → packed training sequences: pure functions, no Ray, no torch.

**Windows.** A chunk's id stream (``<bos>`` + groups, from :func:`voxtral.interleave.encode_ids`)
is cut into *windows* of at most ``(seq_len - 1) / group_len`` whole groups, each starting
with its own ``<bos>``. Every window is therefore a stream the model could meet at
generation time: slot positions (``Layout.slot_at``) stay valid and no window has to be
dropped because its chunk is longer than ``seq_len``.

**Packing, with document masking.** Windows are packed in order into rows of ``seq_len``;
a window that does not fit the rest of a row is cut at a group boundary and continues,
with its own ``<bos>``, in the next row (see :func:`pack`), so rows are nearly full.
Each window gets its own position ids starting at 0, and the model is called with
``attention_mask=None`` and ``use_cache=False``: the position resets are the document
boundaries, which the attention kernel turns into a block-diagonal causal mask, a
FlexAttention document mask or flash-attn varlen boundaries
(:mod:`voxtral.stages.train.attention`), so no token attends across chunks or windows, and
RoPE sees the same positions as at inference. The target of each window's last token is
ignored (the next id belongs to another window), and so is the padding. Packing rather than
one window per row matters because chunk lengths vary (10–30 s against ~24 s windows): the
tail of one chunk fills the rest of a row instead of padding. A row holding a single window
keeps the plain causal path (flash kernels on GPU).

**Targets and streams.** ``labels[t]`` is the id at ``t + 1`` (already shifted) and
``streams[t]`` its stream: text, ``<text_pad>``, the model's first codebook, its other
codebooks, and (two-stream layouts) the user's audio (-1 = ignored), read off the layout's
slot description rather than fixed offsets. The user's audio is input the model conditions
on, so it gets its own stream and loss weight (``train.loss_weight_user_audio``, 0 by
default) instead of counting as the model's speech.

**Two streams** (``tokenizer.streams=2``): a token row carries the model's track in
``codes`` and the user's in ``user_codes``; both go into every window, time-aligned, so
windows of one chunk are cut at the same group boundaries for both speakers.

**Held-out split** is by a salted hash of ``video_id``, so no video is in both splits, the
split is the same on every node and run, and a video keeps its side as the corpus grows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from voxtral.interleave import encode_ids
from voxtral.layout import Layout
from voxtral.schema import codes_from_bytes
from voxtral.stages.train.token_check import check_row_codec, check_row_streams

IGNORE = -100
"""Label of positions that are not trained (the value torch's cross-entropy skips)."""

STREAMS = ("text", "text_pad", "audio_q0", "audio_rest", "user_audio")
TEXT, TEXT_PAD, AUDIO_Q0, AUDIO_REST, USER_AUDIO = range(len(STREAMS))
MODEL_AUDIO = (AUDIO_Q0, AUDIO_REST)
"""The streams of the model's speech (what ``audio_s`` counts: each second of a chunk once)."""
NO_STREAM = -1


# -- rows -------------------------------------------------------------------------------
def row_codes(codes: bytes, n_q: int, frames: int) -> np.ndarray:
    """The ``codes`` column → ``[n_q, frames]`` int64 (embedding indices)."""
    return codes_from_bytes(codes, n_q, frames).astype(np.int64)


def max_window_groups(layout: Layout, seq_len: int) -> int:
    return layout.groups_in(seq_len)


def row_windows(
    layout: Layout,
    codes: np.ndarray,
    text_ids: Sequence[int] | None,
    text_starts_s: Sequence[float] | None,
    seq_len: int,
    user_codes: np.ndarray | None = None,
) -> list[np.ndarray]:
    """One chunk → its windows (each ``<bos>`` + at most ``seq_len - 1`` tokens of groups).

    The chunk is cut into near-equal windows rather than full ones plus a stub, so no
    window is a handful of tokens with almost no context. ``user_codes`` (the user's track,
    ``[n_q, frames]``) is required by a 2-stream layout and ignored by a 1-stream one.
    """
    ids = chunk_stream(layout, codes, text_ids, text_starts_s, user_codes)
    g = layout.group_len
    groups = (len(ids) - 1) // g
    if groups == 0:
        return []
    per = max_window_groups(layout, seq_len)
    n = -(-groups // per)
    bounds = np.linspace(0, groups, n + 1).round().astype(int)
    body, bos = ids[1:], ids[:1]
    return [
        np.concatenate([bos, body[a * g : b * g]]) for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def chunk_stream(
    layout: Layout,
    codes: np.ndarray,
    text_ids: Sequence[int] | None,
    text_starts_s: Sequence[float] | None,
    user_codes: np.ndarray | None = None,
) -> np.ndarray:
    """One chunk's whole id stream (``<bos>`` + groups); ``user_codes`` only with 2 streams."""
    return encode_ids(
        layout,
        codes,
        np.asarray(text_ids if text_ids is not None else [], dtype=np.int64),
        np.asarray(text_starts_s if text_starts_s is not None else [], dtype=np.float64),
        user_codes=user_codes if layout.streams == 2 else None,
    )


def row_user_codes(row: dict, layout: Layout) -> np.ndarray | None:
    """The user's track of a TOKENS row (a dict of its columns) under a 2-stream layout;
    None under a 1-stream one. A 2-stream layout refuses a row without it (single-stream
    tokens), as it refuses rows of another codec."""
    if layout.streams == 1:
        return None
    user = row.get("user_codes")
    check_row_streams(user is not None, layout, str(row["chunk_id"]))
    return row_codes(user, int(row["n_q"]), int(row["frames"]))


def windows_batch(batch: dict, layout: Layout, seq_len: int) -> dict:
    """A batch of TOKENS rows (numpy format) → ``{"window": int32 bytes, "chunk_id"}`` rows,
    for ``Dataset.map_batches``. Rows of another codec or ``n_q``, and single-stream rows
    under a 2-stream layout, are refused here too, so a mixed ``tokens/`` folder can never
    train silently."""
    out_w: list[bytes] = []
    out_c: list[str] = []
    for i in range(len(batch["chunk_id"])):
        codec, n_q = str(batch["codec"][i]), int(batch["n_q"][i])
        check_row_codec(codec, n_q, layout, str(batch["chunk_id"][i]))
        codes = row_codes(batch["codes"][i], n_q, int(batch["frames"][i]))
        row = {k: batch[k][i] for k in ("chunk_id", "n_q", "frames", "user_codes") if k in batch}
        user = row_user_codes(row, layout)
        for w in row_windows(
            layout, codes, batch["text_ids"][i], batch["text_starts_s"][i], seq_len, user
        ):
            out_w.append(w.astype("<i4").tobytes())
            out_c.append(str(batch["chunk_id"][i]))
    return {"window": np.array(out_w, dtype=object), "chunk_id": np.array(out_c, dtype=object)}


def window_from_bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i4").astype(np.int64)


# -- held-out split ---------------------------------------------------------------------
def video_hash(video_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, video_id)``."""
    h = hashlib.blake2b(f"{seed}:{video_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def eval_videos(video_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The held-out videos: hash below ``fraction``. With at least two videos and a
    non-zero fraction at least one is held out and one kept, so a tiny corpus still gets
    an eval split (only then can a video change sides as the corpus grows)."""
    ids = sorted(set(video_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    held = {v for v in ids if video_hash(v, seed) < fraction}
    by_hash = sorted(ids, key=lambda v: video_hash(v, seed))
    if not held:
        held = {by_hash[0]}
    if len(held) == len(ids):
        held.discard(by_hash[-1])
    return held


def split_batch(batch: dict, held_out: frozenset[str] | set[str], keep_eval: bool) -> dict:
    """Rows of held-out videos (``keep_eval``) or the others, for ``map_batches``."""
    mask = np.array([(str(v) in held_out) == keep_eval for v in batch["video_id"]], dtype=bool)
    return {k: np.asarray(v)[mask] for k, v in batch.items()}


# -- per-worker stream ------------------------------------------------------------------
def rank_slice(items: Iterable, rank: int, world: int) -> Iterator:
    """Every ``world``-th item from ``rank``: a deterministic, balanced shard of a stream."""
    for i, item in enumerate(items):
        if i % world == rank:
            yield item


def shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Buffered shuffle: hold ``buffer`` items, emit a random one per item read."""
    pool: list = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


# -- targets and packing ----------------------------------------------------------------
def window_targets(layout: Layout, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, streams) of a window starting at ``<bos>``: position t predicts t + 1; the
    last position has no target inside the window."""
    n = len(window)
    labels = np.full(n, IGNORE, dtype=np.int64)
    streams = np.full(n, NO_STREAM, dtype=np.int8)
    if n < 2:
        return labels, streams
    labels[:-1] = window[1:]
    kinds = stream_of_slots(layout)
    streams[:-1] = kinds[(np.arange(1, n) - 1) % layout.group_len]
    pad = (streams == TEXT) & (labels == layout.vocab.text_pad)
    streams[pad] = TEXT_PAD
    return labels, streams


def stream_of_slots(layout: Layout) -> np.ndarray:
    """Stream of each slot in a group (text slots are text until the id says pad; the
    user's audio is one stream whatever the codebook: it is input, trained at most lightly)."""

    def stream(s) -> int:
        if s.kind == "text":
            return TEXT
        if s.stream == "user":
            return USER_AUDIO
        return AUDIO_Q0 if s.q == 0 else AUDIO_REST

    return np.array([stream(s) for s in layout.slots], dtype=np.int8)


@dataclass
class Packed:
    """One row of ``seq_len`` tokens; arrays are ``[seq_len]``."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    streams: np.ndarray
    windows: int


SPLIT_MIN_FRACTION = 8
"""A window is split to fill a row only if the piece left in the row is at least
1/8 of a row: smaller pieces would be contexts too short to be worth a forward pass."""


def split_window(layout: Layout, window: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``<bos>`` + the first ``groups`` groups, and ``<bos>`` + the rest: two valid streams."""
    cut = 1 + groups * layout.group_len
    return window[:cut], np.concatenate([window[:1], window[cut:]])


def pack(
    windows: Iterable[np.ndarray],
    layout: Layout,
    seq_len: int,
    pad_id: int,
    split: bool = True,
) -> Iterator[Packed]:
    """Pack windows (each <= seq_len) into rows in order, next-fit.

    With ``split``, a window that does not fit the rest of a row is cut at a group
    boundary: its head (with ``<bos>``) fills the row and its tail (with a new ``<bos>``)
    opens the next one, so rows are full but for less than a group (or less than
    1/``SPLIT_MIN_FRACTION`` of a row). Without it the rest of the row is padding, which
    with windows of 10–30 s against ~24 s rows wastes about a third of the compute.
    Padding gets positions restarting at 0 (its own document) and no targets.
    """
    g = layout.group_len
    min_groups = max(1, (seq_len - 1) // g // SPLIT_MIN_FRACTION)
    parts: list[np.ndarray] = []
    used = 0
    for w in windows:
        if len(w) > seq_len:
            raise ValueError(f"window of {len(w)} tokens exceeds seq_len={seq_len}")
        if used + len(w) > seq_len and parts:
            room = (seq_len - used - 1) // g
            if split and min_groups <= room < (len(w) - 1) // g:
                head, w = split_window(layout, w, room)
                parts.append(head)
            yield _emit(parts, layout, seq_len, pad_id)
            parts, used = [], 0
        parts.append(w)
        used += len(w)
    if parts:
        yield _emit(parts, layout, seq_len, pad_id)


def _emit(parts: list[np.ndarray], layout: Layout, seq_len: int, pad_id: int) -> Packed:
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    pos = np.zeros(seq_len, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    streams = np.full(seq_len, NO_STREAM, dtype=np.int8)
    at = 0
    for w in parts:
        n = len(w)
        ids[at : at + n] = w
        pos[at : at + n] = np.arange(n)
        labels[at : at + n], streams[at : at + n] = window_targets(layout, w)
        at += n
    pos[at:] = np.arange(seq_len - at)
    return Packed(ids, pos, labels, streams, len(parts))


def collate(rows: Sequence[Packed]) -> dict[str, np.ndarray]:
    """Rows → ``[B, seq_len]`` arrays."""
    return {
        "input_ids": np.stack([r.input_ids for r in rows]),
        "position_ids": np.stack([r.position_ids for r in rows]),
        "labels": np.stack([r.labels for r in rows]),
        "streams": np.stack([r.streams for r in rows]),
    }


def empty_like_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Same shapes, nothing trained: lets a worker with no data left join a collective step."""
    out = {k: v.copy() for k, v in batch.items()}
    out["labels"][:] = IGNORE
    out["streams"][:] = NO_STREAM
    return out
