"""Two tracks from one diarised chunk, for full-duplex (Moshi-style) two-stream training.

Each conversation chunk gives one example per main speaker with that speaker as "the
model": the model track is that speaker's audio, the user track everyone else's, and the
text stream only the model speaker's words. Pure numpy, no Ray, no torch: a tokenizer or a
data loader calls it per chunk row (``schema.CHUNKS``: ``audio``, ``channels``, ``turns``,
and the token row's ``words`` with their ``speaker``).

Two kinds of source:

- **A mono mix** (most sources; ``channels`` 1): the tracks are the mix times gains from the
  turns (:func:`speaker_gains`). Overlaps (both speakers' turns) go to both tracks: the mix
  cannot be unmixed, and a model must hear, and speak through, the other voice. Audio where
  nobody has a turn (pauses, background, speech the VAD missed) goes to the **user** track
  by default (``residual="user"``): the user track is "the world the model hears", the model
  track stays clean (exact digital silence between the model's turns, what its stream should
  predict when it does not speak), and model + user equals the mix wherever the speakers do
  not overlap. ``residual="none"`` drops it (silence in both).
- **A channel-split stereo source** (``channels`` 2, ``diarization`` ``channels``: one
  speaker per channel, see :mod:`voxtral.diarize.channels`): the tracks are the channels
  themselves, exact, no gains. Stereo audio is ``[2, n]`` (channels first), what
  ``media.decode_stream(stereo=True)``, ``StreamingDiarizer.push_audio`` and
  ``audio.flac_encode`` use (a chunk's FLAC read with ``soundfile`` is ``[n, 2]``: transpose
  it; ``audio.flac_decode`` averages the channels and so gives the mix).

Which channel a speaker is on is not stored: ``channel_turns`` names speakers ``S0``, ``S1``
in order of first appearance in the *video* (:func:`voxtral.diarize.name_speakers`), so
``S0`` is whichever channel spoke first, not channel 0. Pass ``channel_of`` when it is known;
else :func:`infer_channel_of` reads it off the chunk (each speaker's channel is the one that
is loud during its turns), which is exact on a split source, where one channel is at least
10 dB louder than the other in most speech frames.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from voxtral.diarize.turns import Turn


def _spans(turns: Sequence[Turn | dict]) -> list[tuple[float, float, str]]:
    """``(start_s, end_s, speaker)`` of :class:`~voxtral.diarize.Turn` objects or the chunks'
    ``turns`` dicts alike (diarisation gives the first, Parquet rows the second)."""
    out = []
    for t in turns:
        if isinstance(t, dict):
            out.append((float(t["start_s"]), float(t["end_s"]), str(t["speaker"])))
        else:
            out.append((float(t.start_s), float(t.end_s), str(t.speaker)))
    return out


def main_speakers(turns: Sequence[Turn | dict], k: int = 2) -> list[str]:
    """The (at most ``k``) speakers with the most speech time in ``turns``, most first; ties
    broken by id, so the same chunk always gives the same examples. A speaker's time is the
    sum of its turns' lengths (its own overlapping turns, rare, count twice)."""
    time: dict[str, float] = {}
    for a, b, who in _spans(turns):
        time[who] = time.get(who, 0.0) + max(0.0, b - a)
    ranked = sorted((who for who, s in time.items() if s > 0), key=lambda w: (-time[w], w))
    return ranked[: max(0, k)]


def _fade_samples(fade_s: float, sample_rate: int) -> int:
    return max(0, int(round(fade_s * sample_rate)))


def _gains(
    spans: Sequence[tuple[float, float]], n_samples: int, sample_rate: int, fade_s: float
) -> np.ndarray:
    """1 on the union of ``spans`` (clamped to ``[0, n_samples)``), falling linearly to 0
    over ``F = fade_s × rate`` samples outside each span: ``1 - d / (F + 1)`` at ``d``
    samples from the nearest span. The ramps lie *outside* the spans so the turn's own
    audio is never attenuated (its onset and last syllable stay whole); the fade eats into
    the pause next to it. Linear, so no step exceeds ``1 / (F + 1)``: no click."""
    g = np.zeros(n_samples, np.float32)
    f = _fade_samples(fade_s, sample_rate)
    down = (1.0 - np.arange(1, f + 1) / (f + 1)).astype(np.float32)  # d = 1 … F after a span
    for start_s, end_s in spans:
        a = min(max(int(round(start_s * sample_rate)), 0), n_samples)
        b = min(max(int(round(end_s * sample_rate)), 0), n_samples)
        if b <= a:
            continue
        g[a:b] = 1.0
        lo = max(0, a - f)  # the rise before the span: d = a - i
        np.maximum(g[lo:a], down[: a - lo][::-1], out=g[lo:a])
        hi = min(n_samples, b + f)  # the fall after it: d = i - b + 1
        np.maximum(g[b:hi], down[: hi - b], out=g[b:hi])
    return g


def speaker_gains(
    turns: Sequence[Turn | dict],
    speaker: str,
    n_samples: int,
    sample_rate: int,
    fade_s: float = 0.02,
) -> np.ndarray:
    """float32 ``[n_samples]`` in [0, 1]: 1 during ``speaker``'s turns, 0 far from them,
    with linear ``fade_s`` ramps just outside each turn (see :func:`_gains`) so that cutting
    the mix there causes no click. Turns are clamped to the chunk (its samples)."""
    spans = [(a, b) for a, b, who in _spans(turns) if who == speaker]
    return _gains(spans, n_samples, sample_rate, fade_s)


def infer_channel_of(
    wav: np.ndarray, sample_rate: int, turns: Sequence[Turn | dict]
) -> dict[str, int]:
    """``{speaker: channel}`` for a channel-split ``[2, n]`` chunk, read off its audio.

    For each speaker, the energy of each channel over the samples where it alone has a turn
    (all its turns if it is never alone) gives a preference ``10 log10(E0 / E1)`` dB; the
    two main speakers get different channels, the assignment that agrees most with their
    preferences (the chunk may hold one speaker only: it gets its louder channel). Why not
    ``S0`` → channel 0: speakers are named by first appearance in the video (see the module
    docstring). Speakers without a sample in the chunk are left out."""
    wav = _stereo(wav)
    n = wav.shape[1]
    spans = _spans(turns)
    speakers = main_speakers(turns, k=2)
    pref: dict[str, float] = {}
    for who in speakers:
        own = _gains([(a, b) for a, b, w in spans if w == who], n, sample_rate, 0.0) > 0
        other = _gains([(a, b) for a, b, w in spans if w != who], n, sample_rate, 0.0) > 0
        mask = own & ~other if (own & ~other).any() else own
        if not mask.any():
            continue
        e = np.square(wav[:, mask], dtype=np.float64).mean(axis=1)
        pref[who] = float(10 * np.log10((e[0] + 1e-12) / (e[1] + 1e-12)))
    found = [w for w in speakers if w in pref]
    if len(found) == 1:
        return {found[0]: 0 if pref[found[0]] >= 0 else 1}
    if len(found) == 2:
        a, b = found
        return {a: 0, b: 1} if pref[a] - pref[b] >= 0 else {a: 1, b: 0}
    return {}


def _stereo(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 2 or wav.shape[0] != 2:
        raise ValueError(f"stereo audio must be [2, n] (channels first), got shape {wav.shape}")
    return wav


def split_tracks(
    wav: np.ndarray,
    sample_rate: int,
    turns: Sequence[Turn | dict],
    speaker: str,
    channels: int | None = None,
    channel_of: dict[str, int] | None = None,
    fade_s: float = 0.02,
    residual: Literal["user", "none"] = "user",
) -> tuple[np.ndarray, np.ndarray]:
    """``(model_track, user_track)`` float32, each as long as the chunk, ``speaker`` being
    the model.

    ``wav`` ``[n]``: a mono mix. model = wav × ``speaker``'s gains; user = wav × the gains of
    every other speaker's turns, so an overlap is in both tracks; with ``residual="user"``
    the user gain is at least ``1 - model gain``, which puts the audio of no one's turns in
    the user track and makes model + user == wav wherever the speakers do not overlap.

    ``wav`` ``[2, n]`` with ``channels`` 2 (or None): a channel-split source. The model track
    is ``speaker``'s channel, the user track the other one, exactly. ``channel_of`` maps
    speakers to channels; None reads it off the audio (:func:`infer_channel_of`). A ``[2, n]``
    wav with ``channels`` 1 is not split by channel: it is averaged to the mono mix, as
    every mono reader of the chunks does."""
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2:
        _stereo(wav)
        if channels in (None, 2):
            mapping = (
                channel_of if channel_of is not None else infer_channel_of(wav, sample_rate, turns)
            )
            if speaker not in mapping:
                raise ValueError(f"no channel known for speaker {speaker!r} (have {mapping})")
            c = int(mapping[speaker])
            return wav[c].copy(), wav[1 - c].copy()
        wav = wav.mean(axis=0)
    elif wav.ndim != 1:
        raise ValueError(f"audio must be [n] mono or [2, n] stereo, got shape {wav.shape}")
    n = len(wav)
    spans = _spans(turns)
    g_model = _gains([(a, b) for a, b, w in spans if w == speaker], n, sample_rate, fade_s)
    g_user = _gains([(a, b) for a, b, w in spans if w != speaker], n, sample_rate, fade_s)
    if residual == "user":
        np.maximum(g_user, 1.0 - g_model, out=g_user)
    elif residual != "none":
        raise ValueError(f"residual must be 'user' or 'none', got {residual!r}")
    return wav * g_model, wav * g_user


def words_of(words: Sequence[dict] | None, speaker: str) -> list[dict]:
    """The model speaker's words: those whose ``speaker`` is ``speaker``. A word with no
    speaker is dropped: in a chunk with turns every word near speech got one
    (:func:`voxtral.words.with_speakers`), so one without is far from every turn and nobody's
    for certain; putting it in the model's text stream could teach it to say what the other
    speaker said."""
    return [w for w in words or () if w and w.get("speaker") == speaker]


@dataclass
class DuplexExample:
    """One chunk seen from one speaker: its audio is the model track, everyone else's the
    user track, its words the text stream."""

    model_speaker: str
    model_track: np.ndarray
    user_track: np.ndarray
    words: list[dict] = field(default_factory=list)


def duplex_examples(
    wav: np.ndarray,
    sample_rate: int,
    turns: Sequence[Turn | dict],
    words: Sequence[dict] | None = None,
    channels: int | None = None,
    channel_of: dict[str, int] | None = None,
    k: int = 2,
    min_speakers: int = 1,
    fade_s: float = 0.02,
    residual: Literal["user", "none"] = "user",
) -> Iterator[DuplexExample]:
    """One :class:`DuplexExample` per main speaker of a chunk (:func:`main_speakers`, at
    most ``k``), that speaker as the model (:func:`split_tracks`, :func:`words_of`).

    A chunk with one speaker gives one example, its user track what lies outside the
    speaker's turns (pauses, background: near silence; on a split source, the other,
    quiet channel): a stretch where the user only listens is a real duplex situation and
    monologue chunks are common, so dropping them would lose data; ``min_speakers=2`` keeps
    true dialogues only. A chunk without turns (diarisation ``off``/``failed``/``none``)
    gives nothing: there is no model speaker to name, and no telling whose speech it is.
    On a split source a speaker without a channel (no sample of its turns in the chunk) is
    skipped."""
    speakers = main_speakers(turns, k)
    if not speakers or len(speakers) < min_speakers:
        return
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2 and channels in (None, 2) and channel_of is None:
        channel_of = infer_channel_of(wav, sample_rate, turns)  # once for both speakers
    for who in speakers:
        if wav.ndim == 2 and channels in (None, 2) and who not in channel_of:
            continue  # turns with no audio under them in this chunk: no channel to give
        model, user = split_tracks(
            wav, sample_rate, turns, who, channels, channel_of, fade_s, residual
        )
        yield DuplexExample(who, model, user, words_of(words, who))
