"""Regenerate the sample corpus: synthetic multi-speaker dialogues with timed captions.

    uv run data/sample/make_sample.py          # needs espeak-ng (Debian package)

Each dialogue is spoken by espeak-ng with a different voice, pitch and speed per speaker,
with short pauses between turns, then mixed (speakers panned apart in stereo files),
resampled and encoded with PyAV into a different container per file (Ogg/Opus, MP3,
M4A/AAC, WAV, WebM/Opus; mono and stereo; 8 to 48 kHz). Next to each file a ``.vtt``
sidecar gives one cue per clause with an inline timestamp per word.

Clause times are exact (each clause is synthesised on its own and placed on the
timeline); word times inside a clause are shared out in proportion to each word's own
synthesised length.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

HERE = Path(__file__).resolve().parent
ESPEAK_RATE = 22050


@dataclass(frozen=True)
class Speaker:
    name: str
    voice: str
    speed: int
    pitch: int
    pan: float  # -1 left … +1 right


@dataclass(frozen=True)
class Output:
    codec: str
    container: str
    rate: int
    layout: str
    bit_rate: int | None


@dataclass(frozen=True)
class Dialogue:
    name: str
    ext: str
    out: Output
    speakers: tuple[Speaker, ...]
    turns: tuple[tuple, ...]
    """``(speaker index, text)`` or ``(speaker index, text, mode)``, mode BC or OVER."""


BC, OVER = "bc", "over"
"""Turn modes besides the default (a pause, then the turn): ``bc`` is a backchannel spoken
over the end of a clause of the other speaker's turn before it; ``over`` starts the reply
a little before the other speaker finishes."""

DIALOGUES = (
    Dialogue(
        "podcast_en",
        ".ogg",
        Output("libopus", "ogg", 48000, "mono", 24000),
        (
            Speaker("Host", "en-us+m3", 165, 45, 0.0),
            Speaker("Guest", "en-gb+f2", 150, 60, 0.0),
        ),
        (
            (0, "Welcome back to the garden hour. Today I am joined by a real expert."),
            (1, "Thanks for having me. I have been looking forward to this all week."),
            (0, "So let us start simple. What should people plant first in spring?"),
            (
                1,
                "Honestly, start with peas and radishes. They are quick, forgiving, "
                "and they make you feel like a genius.",
            ),
            (0, "Mm-hm.", BC),
            (0, "And what about tomatoes? Everyone asks me about tomatoes."),
            (
                1,
                "Tomatoes need patience. Wait until the nights are warm, "
                "then give them sun and plenty of water.",
            ),
            (0, "Yeah."),
            (0, "What is the most common mistake you see?"),
            (1, "Too much love. People water every day and drown the roots.", OVER),
            (0, "That is a great point. Any advice for people with only a balcony?"),
            (
                1,
                "Herbs and salad leaves in deep pots. Basil, mint, and lettuce "
                "grow happily in small spaces.",
            ),
            (0, "Right.", BC),
            (0, "Wonderful. Thank you so much for coming on the show."),
            (1, "My pleasure. Happy gardening, everyone.", OVER),
        ),
    ),
    Dialogue(
        "interview_en",
        ".mp3",
        Output("libmp3lame", "mp3", 44100, "stereo", 64000),
        (  # hard-panned: each speaker on a channel of their own, like a two-track call
            Speaker("Interviewer", "en-us+f3", 170, 55, -1.0),
            Speaker("Author", "en+m1", 145, 35, 1.0),
        ),
        (
            (0, "Your new book is about trains. Why trains?"),
            (1, "Because a train is the last place where strangers still talk to each other."),
            (0, "Did you really travel across the whole country for it?"),
            (1, "Three months, eleven trains, and far too many sandwiches."),
            (0, "Mm-hm.", BC),
            (0, "What was the best conversation you had on the way?"),
            (
                1,
                "An old fisherman told me about the winter the river froze. "
                "He talked for two hours, and I did not take a single note.",
            ),
            (0, "So how did you write it down?", OVER),
            (1, "I remembered every word. Some stories simply stay with you."),
            (0, "Yeah.", BC),
            (0, "Is there a chapter you almost cut?"),
            (1, "The one about the night train. My editor loved it, so it stayed."),
            (0, "Last question. Where are you travelling next?"),
            (1, "North, to the sea. I hear the trains there are very slow, which is perfect."),
        ),
    ),
    Dialogue(
        "debat_fr",
        ".m4a",
        Output("aac", "mp4", 32000, "stereo", 48000),
        (  # partially panned: both speakers on both channels
            Speaker("Claire", "fr+f4", 170, 70, -0.5),
            Speaker("Pierre", "fr+m2", 150, 40, 0.5),
        ),
        (
            (
                0,
                "Bonsoir Pierre. Ce soir, une seule question : faut-il interdire "
                "les voitures en centre-ville ?",
            ),
            (1, "Je pense que oui. Les rues seraient plus calmes et l'air plus propre."),
            (0, "Mais les commerçants vont perdre leurs clients. Ce n'est pas si simple."),
            (1, "Au contraire, les piétons achètent plus que les automobilistes.", OVER),
            (0, "Oui.", BC),
            (0, "Et les personnes âgées ? Elles ont besoin de leur voiture."),
            (1, "Il faut des navettes gratuites et des bus plus fréquents."),
            (0, "D'accord."),
            (0, "Qui va payer tout cela ? Les impôts augmentent déjà."),
            (1, "Les villes qui l'ont fait dépensent moins pour les routes.", OVER),
            (0, "Merci Pierre. Nous reprenons après une courte pause."),
        ),
    ),
    Dialogue(
        "callin_de",
        ".wav",
        Output("pcm_s16le", "wav", 8000, "mono", None),
        (
            Speaker("Moderator", "de+m3", 160, 45, 0.0),
            Speaker("Anruferin", "de+f3", 155, 65, 0.0),
        ),
        (
            (0, "Guten Abend, Sie sind live auf Sendung. Mit wem spreche ich?"),
            (1, "Hallo, hier ist Anna aus Köln. Ich höre Ihre Sendung jeden Abend."),
            (0, "Das freut mich sehr. Was ist Ihre Frage heute?"),
            (1, "Mein Nachbar spielt jeden Abend Trompete, genau um zehn Uhr."),
            (0, "Mhm.", BC),
            (0, "Haben Sie schon einmal freundlich mit ihm gesprochen?"),
            (1, "Ja, aber er sagt, Musik ist gut für die Seele.", OVER),
            (0, "Vielleicht können Sie eine Uhrzeit vereinbaren, die für beide passt."),
            (1, "Ja.", BC),
            (1, "Das ist eine gute Idee. Ich versuche es morgen."),
            (0, "Viel Glück, Anna, und vielen Dank für Ihren Anruf.", OVER),
        ),
    ),
    Dialogue(
        "charla_es",
        ".webm",
        Output("libopus", "webm", 48000, "stereo", 32000),
        (
            Speaker("Lucía", "es+f1", 165, 60, -0.4),
            Speaker("Mateo", "es+m4", 150, 40, 0.4),
        ),
        (
            (0, "Hola Mateo, ¿qué tal el viaje a la montaña?"),
            (1, "Increíble. Caminamos seis horas y vimos un lago precioso."),
            (0, "Ajá.", BC),
            (0, "¿No hacía mucho frío por la noche?"),
            (1, "Un poco, pero llevamos sacos de dormir muy buenos."),
            (0, "Yo quiero ir el próximo verano. ¿Me recomiendas la ruta?"),
            (1, "Claro que sí. Empieza temprano y lleva mucha agua.", OVER),
            (0, "Sí."),
            (0, "¿Y la comida? ¿Cocinasteis allí arriba?"),
            (1, "Sí, hicimos sopa y arroz con un hornillo pequeño. Fue la mejor cena del año."),
            (0, "Qué envidia. La próxima vez voy con vosotros.", OVER),
            (1, "Claro.", BC),
            (1, "Perfecto, te aviso cuando organicemos la siguiente salida."),
        ),
    ),
)


def speak(text: str, sp: Speaker) -> np.ndarray:
    """espeak-ng → float32 mono at 22.05 kHz (text on stdin: never parsed as options)."""
    cmd = ["espeak-ng", "-v", sp.voice, "-s", str(sp.speed), "-p", str(sp.pitch), "--stdout"]
    wav = subprocess.run(cmd, input=text.encode(), capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    assert sr == ESPEAK_RATE, sr
    return trim(audio)


def trim(audio: np.ndarray, floor: float = 0.01) -> np.ndarray:
    """Cut leading and trailing silence, keeping 10 ms."""
    loud = np.flatnonzero(np.abs(audio) > floor * max(1e-6, np.abs(audio).max()))
    if not len(loud):
        return audio[:0]
    keep = int(0.01 * ESPEAK_RATE)
    return audio[max(0, loud[0] - keep) : loud[-1] + keep]


def clauses(turn: str) -> list[tuple[str, float]]:
    """Split a turn at punctuation; each clause with the pause that follows it."""
    parts = [p.strip() for p in re.findall(r"[^,.;:?!¿¡]*[,.;:?!]+|[^,.;:?!]+$", turn)]
    out = []
    for p in parts:
        if not p.strip("¿¡,.;:?! "):
            continue
        pause = 0.16 if p.endswith((",", ";", ":")) else 0.35
        out.append((p, pause))
    return out


def word_times(clause: str, audio: np.ndarray, sp: Speaker, t0: float) -> list:
    """(word, start, end) inside a clause, from each word's own synthesised length."""
    words = clause.split()
    lengths = np.array([max(1, len(speak(w, sp))) for w in words], dtype=np.float64)
    total = len(audio) / ESPEAK_RATE
    edges = np.concatenate([[0.0], np.cumsum(lengths) / lengths.sum() * total])
    return [(w, t0 + edges[i], t0 + edges[i + 1]) for i, w in enumerate(words)]


def stamp(t: float) -> str:
    h, rem = divmod(t, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:06.3f}"


def place(clause: str, sp: Speaker, start: float) -> tuple[np.ndarray, str, float]:
    """One clause spoken from ``start``: its audio, its VTT cue and its end time."""
    audio = speak(clause, sp)
    end = start + len(audio) / ESPEAK_RATE
    words = word_times(clause, audio, sp, start)
    body = words[0][0] + "".join(f"<{stamp(ws)}> {w}" for w, ws, _ in words[1:])
    return audio, f"{stamp(start)} --> {stamp(end)}\n<v {sp.name}>{body}", end


def render(d: Dialogue, rng: random.Random) -> tuple[np.ndarray, list[str], list[tuple]]:
    """The dialogue as [2, T] audio at 22.05 kHz (left, right), its VTT cues (by start
    time) and its speech segments ``(start_s, end_s, speaker name)``."""
    pieces: list[tuple[float, np.ndarray, Speaker]] = []
    cues: list[tuple[float, str]] = []
    segments: list[tuple[float, float, str]] = []
    t, end = 0.6, 0.0  # where the next turn may start; the end of all speech so far
    before: list[tuple[float, float]] = []  # the clauses of the turn before
    for who, text, *mode in d.turns:
        sp = d.speakers[who]
        if mode == [BC]:  # over the end of a clause of the turn before, into its pause
            anchor = before[0][1] if len(before) > 1 else before[-1][1]
            audio, cue, stop = place(text, sp, anchor - rng.uniform(0.15, 0.3))
            start = stop - len(audio) / ESPEAK_RATE
            pieces.append((start, audio, sp))
            cues.append((start, cue))
            segments.append((start, stop, sp.name))
            end = max(end, stop)
            t = max(t, stop + rng.uniform(0.3, 0.6))
            continue
        if mode == [OVER]:  # the reply starts before the other speaker has finished
            t = before[-1][1] - rng.uniform(0.25, 0.45)
        before = []
        for clause, pause in clauses(text):
            audio, cue, stop = place(clause, sp, t)
            pieces.append((t, audio, sp))
            cues.append((t, cue))
            segments.append((t, stop, sp.name))
            before.append((t, stop))
            end = max(end, stop)
            t = stop + pause
        t = max(t, end) + rng.uniform(0.25, 0.8)  # the gap between turns
    total = int((end + 1.0) * ESPEAK_RATE)
    mix = np.zeros((2, total), np.float32)
    for at, audio, sp in pieces:
        i = int(round(at * ESPEAK_RATE))
        gains = (np.sqrt((1 - sp.pan) / 2), np.sqrt((1 + sp.pan) / 2))
        for ch in (0, 1):
            mix[ch, i : i + len(audio)] += gains[ch] * audio * 0.7
    cues.sort(key=lambda c: c[0])
    segments.sort()
    return mix, [c for _, c in cues], segments


def rttm(name: str, segments: list[tuple[float, float, str]]) -> str:
    """Speech segments as RTTM lines, the format diarisation scorers read."""
    return "".join(
        f"SPEAKER {name} 1 {a:.3f} {b - a:.3f} <NA> <NA> {who} <NA> <NA>\n"
        for a, b, who in segments
    )


def overlap_share(segments: list[tuple[float, float, str]]) -> float:
    """Share of speech time during which both speakers talk."""
    step = 0.01
    n = int(max(b for _, b, _ in segments) / step) + 1
    who = {w: np.zeros(n, bool) for _, _, w in segments}
    for a, b, w in segments:
        who[w][int(a / step) : int(b / step)] = True
    count = np.sum(list(who.values()), axis=0)
    return float((count > 1).sum() / max(1, (count > 0).sum()))


def pcm(block: np.ndarray, fmt: str) -> np.ndarray:
    """[C, n] float → the array PyAV wants for sample format ``fmt``."""
    scale = {"s16": (np.int16, 32767), "s32": (np.int32, 2**31 - 1), "flt": (np.float32, 1)}
    dtype, peak = scale[fmt.rstrip("p")]
    out = (block * peak).astype(dtype) if peak != 1 else block.astype(dtype)
    return np.ascontiguousarray(out if fmt.endswith("p") else out.T.reshape(1, -1))


def encode(path: Path, audio: np.ndarray, out: Output) -> None:
    """[2, T] audio at 22.05 kHz → ``path`` with PyAV."""
    x = torch.from_numpy(audio)
    if out.layout == "mono":
        x = x.mean(0, keepdim=True) * np.sqrt(2)
    x = AF.resample(x, ESPEAK_RATE, out.rate).clamp(-1, 1).numpy()
    with av.open(str(path), "w", format=out.container) as c:
        st = c.add_stream(out.codec, rate=out.rate, layout=out.layout)
        if out.bit_rate:
            st.bit_rate = out.bit_rate
        fmt = st.codec_context.format.name
        size = st.codec_context.frame_size or 1024
        for i in range(0, x.shape[1], size):
            frame = av.AudioFrame.from_ndarray(
                pcm(x[:, i : i + size], fmt), format=fmt, layout=out.layout
            )
            frame.sample_rate = out.rate
            frame.pts = i
            for packet in st.encode(frame):
                c.mux(packet)
        for packet in st.encode(None):
            c.mux(packet)


def main(out_dir: Path = HERE) -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
    for n, d in enumerate(DIALOGUES):
        audio, cues, segments = render(d, random.Random(n))
        target = out_dir / f"{d.name}{d.ext}"
        encode(target, audio, d.out)
        vtt = "WEBVTT\n\n" + "\n\n".join(cues) + "\n"
        (out_dir / f"{d.name}.vtt").write_text(vtt, encoding="utf-8")
        (out_dir / f"{d.name}.rttm").write_text(rttm(d.name, segments), encoding="utf-8")
        print(f"{target.name}: {audio.shape[1] / ESPEAK_RATE:.1f} s, "
              f"{target.stat().st_size / 1024:.0f} KiB, {len(cues)} cues, "
              f"overlap {overlap_share(segments):.1%} of speech")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
