"""Scrape throughput: an hour or more of generated speech served on loopback.

    uv run bench/scrape.py [--files N] [--minutes M] [--cores C]

Prints one JSON line:
- ``xrt``: the stage's x-realtime (audio seconds / wall seconds of ``run_scrape`` on Ray),
- ``xrt_per_core``: ``xrt`` divided by the CPUs Ray was given,
- ``peak_rss_mb_3h``: peak RSS of the (fresh) worker process that scrapes a 3-hour file,
- ``speedup_vs_sequential``: ``xrt`` over a plain sequential loop calling the same
  per-video function on the same files, measured in the same run.

The audio is the bundled sample dialogues as 64 kbps Opus, 48 kHz stereo (what YouTube's
best audio usually is), built by repeating encoded packets so that generating hours of
it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import av  # noqa: E402
import numpy as np  # noqa: E402
from _scrape_media import Route, loop_speech, serve  # noqa: E402

from voxtral.config import load_config  # noqa: E402
from voxtral.stages.index import write_rows  # noqa: E402
from voxtral.storage import Storage  # noqa: E402

SR = 24000


def opus_packets(audio: np.ndarray, bit_rate: int = 64000) -> tuple[list[bytes], int]:
    """Encode mono 24 kHz speech as 48 kHz stereo Opus; return the packets and their step."""
    import torch

    from voxtral.audio import resample

    x = resample(torch.from_numpy(audio), SR, 48000).numpy()
    stereo = np.ascontiguousarray(np.stack([x * 0.8, x * 0.6]).T.reshape(1, -1), np.float32)
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = 48000, "stereo", "flt", bit_rate
    ctx.time_base = Fraction(1, 48000)
    ctx.open()
    step = ctx.frame_size
    packets = []
    for i in range(0, stereo.shape[1] // 2 - step, step):
        frame = av.AudioFrame.from_ndarray(
            stereo[:, 2 * i : 2 * (i + step)], format="flt", layout="stereo"
        )
        frame.sample_rate, frame.pts = 48000, i
        packets += [bytes(p) for p in ctx.encode(frame)]
    return packets, step


def write_opus(path: Path, packets: list[bytes], step: int, seconds: float) -> Path:
    """An Ogg/Opus file of ``seconds``: the packets repeated, timestamps advancing."""
    with av.open(str(path), "w", format="ogg") as c:
        st = c.add_stream("libopus", rate=48000, layout="stereo")
        st.bit_rate = 64000
        st.codec_context.open()
        tb = Fraction(1, 48000)
        n = int(seconds * 48000 / step)
        for i in range(n):
            p = av.Packet(packets[i % len(packets)])
            p.pts = p.dts = i * step
            p.duration, p.time_base, p.stream = step, tb, st
            c.mux(p)
    return path


def rows_for(server, names: list[str], seconds: dict[str, float], prefix: str) -> list[dict]:
    return [
        {
            "video_id": f"{prefix}{i:03d}",
            "url": server.url(name),
            "title": name,
            "channel": "bench",
            "duration_s": seconds[name],
            "search_term": "",
            "source": "youtube",
        }
        for i, name in enumerate(names)
    ]


def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM belongs to the address space, so unlike ru_maxrss
    it does not inherit the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scrape_in_fresh_worker(row: dict, cfg) -> dict:
    """Runs in a Ray worker used for this one call: its peak RSS is this video's."""
    import torch

    from voxtral.stages.scrape import scrape_video
    from voxtral.vad import silero_session

    torch.set_num_threads(1)
    silero_session()
    before = peak_rss_mb()  # the libraries alone (torch is most of it)
    out = scrape_video(row, cfg)
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_before_mb"] = before
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--files", type=int, default=None, help="default: max(8, 4 x cores)")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of each file")
    ap.add_argument("--long-hours", type=float, default=3.0, help="the RSS file's length")
    ap.add_argument("--quick", action="store_true", help="smoke run: seconds of work")
    args = ap.parse_args()
    if args.quick:
        args.files, args.minutes, args.long_hours = 2, 0.5, 0.02
    n_files = args.files or max(8, 4 * args.cores)

    import ray
    import torch

    from voxtral.ray_utils import init_ray
    from voxtral.stages.scrape import run_scrape, scrape_video

    work = Path(tempfile.mkdtemp(prefix="voxtral-bench-"))
    speech = loop_speech(["podcast_en", "interview_en", "debat_fr", "callin_de", "charla_es"], 300)
    audio = speech.audio
    if args.quick:  # only the packets the files use (file i starts i s in, none wraps): the
        # same packets as encoding it all, in a seventh of the time
        used_s = max(args.minutes * 60 + n_files, args.long_hours * 3600)
        audio = audio[: int((used_s + 2) * SR)]
    packets, step = opus_packets(audio)
    seconds: dict[str, float] = {}
    for i in range(n_files):
        name = f"talk{i:03d}.ogg"
        write_opus(work / name, packets[i * 50 :] + packets[: i * 50], step, args.minutes * 60)
        seconds[name] = args.minutes * 60
    write_opus(work / "long.ogg", packets, step, args.long_hours * 3600)
    seconds["long.ogg"] = args.long_hours * 3600
    server = serve({name: Route("file", work / name) for name in seconds})
    names = sorted(n for n in seconds if n != "long.ogg")
    # the "youtube" rows point at this script's loopback server, a host that real rows refuse
    overrides = [
        f"scrape.tmp_dir={work / 'tmp'}",
        "scrape.retries=1",
        "scrape.timeout_s=30",
        "scrape.allow_private_hosts=true",
    ]

    # the stage on Ray: one scrape task per core
    init_ray(num_cpus=args.cores, include_dashboard=False)
    cfg = load_config(
        None,
        [f"storage.root={work / 'ray'}", f"scrape.concurrency={args.cores}", *overrides],
        env={},
    )
    if not args.quick:  # start the workers and load the models, as a long stage run would
        warm = load_config(None, [f"storage.root={work / 'warm'}", *overrides], env={})
        warm_rows = rows_for(server, names[:1] * args.cores, seconds, "w")
        write_rows(Storage(warm.storage.root), warm_rows)
        run_scrape(warm)
    write_rows(Storage(cfg.storage.root), rows_for(server, names, seconds, "v"))
    stage = run_scrape(cfg)
    assert stage["done"] == n_files, stage

    # peak memory of one worker scraping the 3-hour file
    long_cfg = load_config(None, [f"storage.root={work / 'long'}", *overrides], env={})
    (long_row,) = rows_for(server, ["long.ogg"], seconds, "long")
    fresh = ray.remote(num_cpus=1, max_calls=1)(scrape_in_fresh_worker)
    long_out = ray.get(fresh.remote(long_row, long_cfg))
    assert long_out["status"] == "done", long_out
    ray.shutdown()

    # the same files, the same function, a plain loop in this process
    torch.set_num_threads(1)
    seq_cfg = load_config(None, [f"storage.root={work / 'seq'}", *overrides], env={})
    scrape_video(rows_for(server, names[:1], seconds, "warm")[0], seq_cfg)
    t0 = time.perf_counter()
    audio_s = 0.0
    for row in rows_for(server, names, seconds, "s"):
        out = scrape_video(row, seq_cfg)
        assert out["status"] == "done", out
        audio_s += out["audio_s"]
    seq_xrt = audio_s / (time.perf_counter() - t0)
    server.close()

    print(
        json.dumps(
            {
                "xrt": round(stage["xrt"], 1),
                "xrt_per_core": round(stage["xrt"] / args.cores, 1),
                "peak_rss_mb_3h": round(long_out["peak_rss_mb"], 1),
                "speedup_vs_sequential": round(stage["xrt"] / seq_xrt, 2),
                "sequential_xrt": round(seq_xrt, 1),
                "rss_before_mb_3h": round(long_out["rss_before_mb"], 1),
                "xrt_3h_file": round(long_out["audio_s"] / long_out["wall_s"], 1),
                "cores": args.cores,
                "hours": round(stage["audio_hours"], 2),
                "files": n_files,
                "codec": "opus 64 kbps 48 kHz stereo",
            }
        ),
        flush=True,
    )
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
