"""Diarisation: who speaks when in one video, with speaker ids consistent across its chunks.

Two ways, decided per source once its audio has been seen (:func:`is_channel_split`):

- **By channel** (exact): a stereo source whose channels carry different speakers (a
  two-track call or podcast recording) needs no model. Speaker ``k`` speaks in a speech
  frame when its channel is loud there (:func:`channel_activity`); both loud is overlap.
- **By voice** (a pretrained speaker encoder, then clustering): resemblyzer's
  ``VoiceEncoder`` (its weights ship inside the wheel: offline, CPU) embeds sliding windows
  of speech; agglomerative clustering on cosine distance with a threshold finds the
  speakers (:func:`cluster`); the windows' labels vote per frame (:func:`frame_labels`),
  and the frames become turns (:func:`turns_from_labels`).

Why agglomerative clustering with a distance rule rather than spectral clustering with an
eigengap: the rule says "one speaker" as readily as "three", where an eigengap needs at
least two clusters to exist, and one-speaker videos (lectures, monologues) are common.
Measured on the sample corpus, a plain cosine threshold on the raw embeddings could not
separate its closest pair of voices (same-voice and other-voice window distances overlap),
so the tree is built on embeddings centred on the video's mean, and the speaker count is
decided on the distance between speaker centroids (:func:`cluster`), which averages the
per-window noise away. ``diarize.max_speakers`` caps the count.

Streaming: the caller feeds decoded blocks and the VAD's per-frame probabilities as they
come (``voxtral.vad``: the scrape's own silero decisions are reused, no second VAD).
Audio waits only until the VAD has judged it, then its windows are embedded (256 floats
per window) and the samples dropped; the clustering runs at the end over the embeddings.
So memory is bounded by the VAD's look-ahead whatever the video's length.

Overlap on a mono mix is a heuristic: where one speaker's turn runs into the other's
without a pause, both are taken to speak for ``diarize.overlap_s`` on each side of the
change (people rarely hand over in exactly no time; a hand-over without a pause is mostly
one voice starting over the other's last syllables). A backchannel spoken over a long turn
is not found. By channel, overlap is exact.
"""

from voxtral.diarize.channels import channel_activity, channel_turns, is_channel_split
from voxtral.diarize.stream import StreamingDiarizer, diarize_file, diarize_waveform
from voxtral.diarize.turns import (
    Diarization,
    DiarizeError,
    Turn,
    der,
    name_speakers,
    read_rttm,
    turns_within,
)
from voxtral.diarize.voices import cluster, frame_labels, turns_from_labels, voice_encoder

__all__ = [
    "Diarization",
    "DiarizeError",
    "StreamingDiarizer",
    "Turn",
    "channel_activity",
    "channel_turns",
    "cluster",
    "der",
    "diarize_file",
    "diarize_waveform",
    "frame_labels",
    "is_channel_split",
    "name_speakers",
    "read_rttm",
    "turns_from_labels",
    "turns_within",
    "voice_encoder",
]
