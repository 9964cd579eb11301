"""One audio file → chunk rows (the scrape stage's work on a downloaded file).

The file is decoded as a stream at the codec rate (``voxtral.media.decode_stream``); speech
is found with silero-vad (``voxtral.vad``) and chunks are cut at pauses
(``voxtral.chunking``); each chunk is stored as FLAC with the caption words inside it, and
the rows are streamed to a Parquet file, so memory holds a few minutes of audio whatever
the file's length. The stream is diarised on the way (``voxtral.diarize``): the turns are
attached once the whole file has been heard. No Ray here: :mod:`voxtral.stages.scrape`
runs it per video.
"""

from __future__ import annotations

import math

import numpy as np

from voxtral import schema
from voxtral.audio import StreamResampler, flac_encode
from voxtral.captions import CaptionIndex
from voxtral.chunking import ChunkPlanner, SampleWindow
from voxtral.codec import codec_info
from voxtral.config import Config
from voxtral.diarize.chunks import Speakers, attach_speakers
from voxtral.download import ScrapeFailure, check_duration
from voxtral.media import DecodeStats, decode_stream
from voxtral.storage import ParquetRowWriter
from voxtral.vad import FRAME_S, BatchedVAD

PAD_S = 0.25
"""Silence kept before a chunk's first and after its last speech."""
ROW_GROUP = 32
TRUNCATION_SLACK = 0.9
"""A decode that yields less than this share of the announced duration is truncated."""


def target_sample_rate(cfg: Config) -> int:
    """The rate chunks are stored at: the configured codec's (24 kHz for EnCodec and Mimi)."""
    return codec_info(cfg.codec).sample_rate


class _ChunkCutter:
    """Turns the planner's chunks into chunk rows: slices their samples out of the window,
    drops the too short and the too quiet, encodes FLAC and streams the rows out."""

    def __init__(self, video_id: str, cfg: Config, out_path: str, captions: CaptionIndex | None):
        self.video_id, self.sc, self.captions = video_id, cfg.scrape, captions
        self.sr = target_sample_rate(cfg)
        self.hop = round(self.sr * FRAME_S)
        self.min_samples = round((self.sc.min_chunk_s - FRAME_S) * self.sr)
        self.samples = SampleWindow()
        self.writer = ParquetRowWriter(out_path, schema.CHUNKS, ROW_GROUP, {"audio": "NONE"})
        self.speech_s = self.audio_s = 0.0
        self.low_speech = 0

    def emit(self, chunks) -> None:
        for ch in chunks:
            a, b = ch.start * self.hop, min(ch.end * self.hop, self.samples.end)
            if b - a < self.min_samples:
                continue
            if ch.speech_ratio < self.sc.min_speech_ratio:
                self.low_speech += 1
                continue
            start_s, dur_s = a / self.sr, (b - a) / self.sr
            audio = self.samples.slice(a, b)
            self.writer.add(
                {
                    "chunk_id": f"{self.video_id}-{self.writer.count:05d}",
                    "video_id": self.video_id,
                    "start_s": start_s,
                    "duration_s": dur_s,
                    "sample_rate": self.sr,
                    "audio": flac_encode(audio, self.sr),
                    "speech_ratio": ch.speech_ratio,
                    "captions": self.captions.within(start_s, start_s + dur_s)
                    if self.captions
                    else [],
                    "channels": audio.shape[0] if audio.ndim == 2 else 1,
                    "turns": [],
                    "diarization": "off",
                }
            )
            self.speech_s += ch.speech * FRAME_S
            self.audio_s += dur_s


def cut_audio(
    path: str,
    video_id: str,
    cfg: Config,
    out_path: str,
    captions: CaptionIndex | None = None,
    expected_s: float | None = None,
) -> dict:
    """Decode ``path`` as a stream, cut it into chunks and write their rows to ``out_path``.

    Returns figures about the audio; raises ``AudioError`` subclasses or ``ScrapeFailure``
    (``truncated``, ``empty``, ``no_speech``) when the file gives no usable chunks.
    """
    sc = cfg.scrape
    dc = cfg.diarize
    cut = _ChunkCutter(video_id, cfg, out_path, captions)
    sr, hop, samples = cut.sr, cut.hop, cut.samples
    vad = BatchedVAD(sc.vad_rate)
    to_vad = StreamResampler(sr, sc.vad_rate)
    planner = ChunkPlanner(
        min_frames=math.ceil(sc.min_chunk_s / FRAME_S - 1e-6),
        max_frames=math.floor(sc.max_chunk_s / FRAME_S + 1e-6),
        pad_frames=round(PAD_S / FRAME_S),
        threshold=sc.vad_threshold,
    )
    stats = DecodeStats()
    max_samples = cfg.index.max_duration_s * sr
    diarizer = Speakers(dc, sr, sc.vad_threshold)
    try:
        stereo = dc.enabled and dc.method == "resemblyzer" and dc.channel_split
        for block in decode_stream(path, sr, stats=stats, stereo=stereo):
            n = block.shape[-1]
            if not n:
                continue
            check_duration(stats.header_duration_s, cfg.index.max_duration_s)
            if samples.end + n > max_samples:  # the header may lie or say nothing
                check_duration((samples.end + n) / sr, cfg.index.max_duration_s)
            samples.append(block)
            diarizer.push_audio(block)
            probs = vad.push(to_vad.push(block.mean(axis=0) if block.ndim == 2 else block))
            diarizer.push_vad(probs)
            cut.emit(planner.push(probs))
            samples.drop_before(planner.pos * hop)
        tail = np.concatenate([vad.push(to_vad.flush()), vad.flush()])
        diarizer.push_vad(tail)
        cut.emit(planner.finish(tail))
    finally:
        cut.writer.close()
    audio_s = samples.end / sr
    if audio_s <= 0:
        raise ScrapeFailure("empty", "the file decodes to no audio")
    expected = expected_s if expected_s and expected_s > 0 else stats.header_duration_s
    if expected and audio_s < TRUNCATION_SLACK * expected - 1.0:
        raise ScrapeFailure(
            "truncated", f"decoded {audio_s:.1f} s of an announced {expected or 0:.1f} s"
        )
    if cut.writer.count == 0:
        if audio_s < sc.min_chunk_s:
            raise ScrapeFailure("too_short", f"{audio_s:.1f} s is under scrape.min_chunk_s")
        raise ScrapeFailure(
            "no_speech",
            f"no chunk with speech_ratio >= {sc.min_speech_ratio} in {audio_s:.1f} s "
            f"(speech found: {planner.speech_frames * FRAME_S:.1f} s)",
        )
    speakers = diarizer.finish(path)
    per_chunk = attach_speakers(out_path, speakers)
    return {
        "audio_s": audio_s,
        "chunks": cut.writer.count,
        "chunk_s": cut.audio_s,
        "speech_s": cut.speech_s,
        "dropped_low_speech": cut.low_speech,
        "vad_model_s": vad.model_frames * FRAME_S,
        "source_rate": stats.source_rate,
        "channels": stats.channels,
        "codec": stats.codec,
        **speakers.figures(),
        "speakers_per_chunk": {str(k): v for k, v in sorted(per_chunk.items())},
    }
