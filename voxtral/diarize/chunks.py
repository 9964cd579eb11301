"""Turns for one video's chunk rows: the scrape's diarisation of the stream (guarded: a
failure costs the turns, never the chunks) and the rewrite that gives each row its turns
once the whole video has been heard."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voxtral import schema
from voxtral.audio import flac_decode, flac_encode
from voxtral.config import DiarizeConfig
from voxtral.diarize.stream import StreamingDiarizer, diarize_file
from voxtral.diarize.turns import Diarization, Turn, turns_within
from voxtral.words import speaker_of


class Speakers:
    """The video's diarisation while it streams (:mod:`voxtral.diarize`), and what it gave:
    a failure costs the turns, never the chunks (see :func:`attach_speakers`)."""

    def __init__(self, cfg: DiarizeConfig, sr: int, vad_threshold: float):
        self.cfg, self.sr = cfg, sr
        self.stream: StreamingDiarizer | None = None
        self.result: Diarization | None = None
        self.status, self.error = ("off", "") if not cfg.enabled else ("", "")
        if cfg.enabled and cfg.method == "resemblyzer":
            self._guard(lambda: setattr(self, "stream", StreamingDiarizer(cfg, sr, vad_threshold)))

    def _guard(self, fn) -> None:
        if self.status == "failed":
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the rows and the summary
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            self.stream = None

    def push_audio(self, block: np.ndarray) -> None:
        if self.stream is not None:
            self._guard(lambda: self.stream.push_audio(block))

    def push_vad(self, probs: np.ndarray) -> None:
        if self.stream is not None:
            self._guard(lambda: self.stream.push_vad(probs))

    def finish(self, path: str) -> Speakers:
        if self.status in ("off", "failed"):
            return self

        def run() -> None:
            if self.stream is not None:
                self.result = self.stream.finish()
            else:  # pyannote: the whole file at once
                self.result = diarize_file(path, self.cfg)
            self.status = self.result.method

        self._guard(run)
        return self

    @property
    def turns(self) -> list[Turn]:
        return self.result.turns if self.result is not None else []

    def figures(self) -> dict:
        r = self.result
        return {
            "diarization": self.status,
            "diarize_error": self.error,
            "speakers": r.speakers if r else 0,
            "overlap_s": r.overlap_s() if r else 0.0,
            "channel_split": self.status == "channels",
        }


def attach_speakers(path: str, speakers: Speakers) -> Counter:
    """Give every chunk row of ``path`` its turns and every caption word its speaker, once
    the whole video is diarised (the rows were streamed out before the clustering could
    run). Rewrites the file a row group at a time: memory holds one row group. A stereo
    chunk of a source that was not split by channel is down-mixed to mono here, so only
    channel-split sources keep two channels. Returns how many chunks have 0, 1, 2… speakers."""
    split = speakers.status == "channels"
    per_chunk: Counter = Counter()
    tmp = path + ".speakers"
    src = pq.ParquetFile(path)
    writer = pq.ParquetWriter(tmp, schema.CHUNKS, compression={"audio": "NONE"},
                              use_dictionary=False)  # fmt: skip
    try:
        for g in range(src.num_row_groups):
            rows = src.read_row_group(g).to_pylist()
            for r in rows:
                end = r["start_s"] + r["duration_s"]
                r["turns"] = turns_within(speakers.turns, r["start_s"], end)
                r["diarization"] = speakers.status
                per_chunk[len({t["speaker"] for t in r["turns"]})] += 1
                for w in r["captions"]:
                    w["speaker"] = speaker_of(r["turns"], w["start_s"], w["end_s"])
                if r["channels"] == 2 and not split:
                    wav, rate = flac_decode(r["audio"])
                    r["audio"], r["channels"] = flac_encode(wav, rate), 1
            writer.write_table(pa.Table.from_pylist(rows, schema=schema.CHUNKS))
    finally:
        writer.close()
    os.replace(tmp, path)
    return per_chunk
