"""Benchmark the voice endpoint; prints one JSON line.

Keys: ``device``, ``sessions`` (N), ``first_audio_ms_p50`` / ``first_audio_ms_p95`` (end of
the user's speech to the first audio message of the model's turn, over the N concurrent
sessions; it includes the end-of-turn silence the VAD waits for, ``end_of_turn_ms``),
``rtf_1`` / ``rtf_n`` (generation wall seconds per second of audio produced, one session
alone and N at once; generation is left unpaced here so it runs as fast as it can).
With ``--sweep MAX`` (engine mode) also ``sessions_at_rtf_0.5``: the most sessions at once,
up to MAX, whose RTF stays at or below ``--rtf-target`` (0.5: generation twice as fast as
real time), found by doubling then bisecting; ``rtf_by_sessions`` holds every round.

    uv run bench/serve.py                 # full stack: Ray Serve + websockets, local profile
                                          # with one stream (half duplex: its turns are timed)
    uv run bench/serve.py --engine        # the model side alone, in process (no Ray)
    uv run bench/serve.py --url http://127.0.0.1:8000    # an endpoint that is already up
    python bench/serve.py --engine --base 1b --sweep 64 --set serve.num_gpus=1 \
        --set model.dtype=bfloat16

``--base`` swaps the tiny model for a larger random-init Mistral of the same tokenizer
(a shape of ``bench/shapes.py``: ``small`` 512 wide, 8 layers; ``1b`` 2048 wide, 18
layers; ``7b``), for GPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.shapes import SHAPES, mistral_config  # noqa: E402
from voxtral.config import add_config_args, config_from_args  # noqa: E402

RATE = 24_000


SAMPLE_TURN = ("callin_de.wav", 0.6)  # a bundled sample dialogue, where its first turn starts


def speech(seconds: float = 1.6) -> np.ndarray:
    """A spoken sentence at 24 kHz: espeak-ng's, else a bundled sample dialogue's first turn.
    Real speech either way: the half-duplex server's VAD must hear a turn to answer it (it
    hears nothing in a synthetic voiced-like signal)."""
    import soundfile as sf

    from voxtral.audio import prepare

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        name, start_s = SAMPLE_TURN
        x, sr = sf.read(REPO / "data" / "sample" / name, dtype="float32", always_2d=True)
        x = x[int(start_s * sr) :, 0]
    else:
        import subprocess

        with tempfile.TemporaryDirectory() as d:
            wav = Path(d) / "s.wav"
            text = "Hello there. How are you doing today? Tell me a story about the sea."
            subprocess.run([espeak, "-s", "170", "-w", str(wav), text], check=True)
            x, sr = sf.read(wav, dtype="float32")
    y = prepare(x, sr, RATE).numpy()[: int(seconds * RATE)]
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def random_base(size: str, folder: Path) -> Path:
    """A random-init Mistral of ``size`` with the tiny model's tokenizer."""
    import torch
    from transformers import MistralForCausalLM

    from voxtral.model import tiny_mistral_dir, write_tiny_mistral

    tiny = write_tiny_mistral(tiny_mistral_dir())
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    cfg = mistral_config(size, vocab, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    MistralForCausalLM(cfg).save_pretrained(folder)
    for f in tiny.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return folder


def percentile(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 1) if xs else float("nan")


def rtf(turns: list[dict]) -> float:
    """Wall seconds per second of audio generated (below 1: faster than real time)."""
    return round(sum(r["wall_s"] for r in turns) / sum(r["audio_s"] for r in turns), 4)


# -- the model side alone ---------------------------------------------------------------------
async def engine_turns(sched, n: int, clip: np.ndarray, tag: str) -> list[dict]:
    """N conversations at once: prefill the clip, end the turn, generate; per session the
    first-audio delay (end_turn → first chunk) and the turn's wall/audio seconds."""

    async def one(i: int) -> dict:
        sid = f"{tag}-{i}"
        await sched.open(sid)
        for k in range(0, len(clip), 3840):  # 160 ms pieces, as the Gateway sends them
            await sched.feed(sid, clip[k : k + 3840])
        t0 = time.perf_counter()
        await sched.end_turn(sid)
        first = None
        async for item in sched.respond(sid):
            if first is None and "audio" in item and len(item["audio"]):
                first = time.perf_counter() - t0
            if "end" in item:
                await sched.close(sid)
                return {"first_s": first, "wall_s": item["wall_s"], "audio_s": item["audio_s"]}
        raise RuntimeError("turn ended without an end item")

    return await asyncio.gather(*(one(i) for i in range(n)))


async def most_sessions(measure, target: float, most: int) -> tuple[int, dict[int, float]]:
    """The largest session count up to ``most`` whose ``await measure(n)`` (an RTF) stays at
    or below ``target``: doubling from 1, then bisecting; 0 when one session is too slow.
    Returns it with every RTF measured."""
    seen: dict[int, float] = {}

    async def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = await measure(n)
        return seen[n] <= target

    if not await fits(1):
        return 0, seen
    lo, hi = 1, None
    while hi is None and lo < most:
        n = min(2 * lo, most)
        lo, hi = (n, None) if await fits(n) else (lo, n)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if await fits(mid) else (lo, mid)
    return lo, seen


def run_engine(cfg, n: int, rounds: int, sweep: int = 0, target: float = 0.5) -> tuple[dict, dict]:
    from serve_app.model_source import resolve_model
    from serve_app.scheduler import build_scheduler

    sched, info = build_scheduler(cfg, resolve_model(cfg).describe())
    clip = speech()
    eot = cfg.serve.end_of_turn_ms

    async def at_once(k: int) -> float:
        return rtf(await engine_turns(sched, k, clip, f"s{k}"))

    async def main():
        await engine_turns(sched, 1, clip, "warm")
        single = [r for k in range(rounds) for r in await engine_turns(sched, 1, clip, f"a{k}")]
        many = [r for k in range(rounds) for r in await engine_turns(sched, n, clip, f"b{k}")]
        swept = await most_sessions(at_once, target, sweep) if sweep else None
        return single, many, swept

    try:
        single, many, swept = asyncio.run(main())
    finally:
        sched.shutdown()
    firsts = [r["first_s"] * 1000 + eot for r in many]
    out = {
        "first_audio_ms_p50": percentile(firsts, 50),
        "first_audio_ms_p95": percentile(firsts, 95),
        "rtf_1": rtf(single),
        "rtf_n": rtf(many),
    }
    if swept is not None:
        out[f"sessions_at_rtf_{target:g}"] = swept[0]
        out["rtf_by_sessions"] = {str(k): v for k, v in sorted(swept[1].items())}
    return out, info


# -- the full stack ---------------------------------------------------------------------------
async def ws_turns(url: str, token: str | None, n: int, clip: np.ndarray) -> list[dict]:
    import websockets

    from serve_app import protocol as P
    from serve_app.audio_io import float_to_pcm16

    async def one(i: int) -> dict:
        q = "?codec=pcm16" + (f"&token={token}" if token else "")
        async with websockets.connect(
            url.replace("http", "ws") + "/api/chat" + q, max_size=None
        ) as ws:
            state = {"first": None, "end": None, "server": None}
            spoke_at = [0.0]

            async def receive():
                async for m in ws:
                    if m[0] == P.Kind.AUDIO and state["first"] is None and spoke_at[0]:
                        state["first"] = time.perf_counter() - spoke_at[0]
                    elif m[0] == P.Kind.METADATA:
                        ev = json.loads(m[1:])
                        if ev.get("event") == "first_audio":
                            state["server"] = ev["latency_ms"]
                        if ev.get("event") == "turn_end":
                            state["end"] = ev
                            return

            task = asyncio.ensure_future(receive())
            audio = np.concatenate([np.zeros(int(0.3 * RATE), np.float32), clip])
            start = time.perf_counter()
            for k in range(0, len(audio), 1920):
                await ws.send(P.audio(float_to_pcm16(audio[k : k + 1920])))
                await asyncio.sleep(max(0.0, start + (k + 1920) / RATE - time.perf_counter()))
            spoke_at[0] = time.perf_counter()
            k = 0
            while not task.done() and k < 120 * RATE:
                await ws.send(P.audio(float_to_pcm16(np.zeros(1920, np.float32))))
                k += 1920
                await asyncio.sleep(max(0.0, spoke_at[0] + k / RATE - time.perf_counter()))
            await asyncio.wait_for(task, 30)
            e = state["end"]
            if e is None:  # the server ended the session (or never heard a turn) first
                raise SystemExit(
                    f"{url}: the session closed before its turn ended "
                    f"(close code {ws.close_code}: {ws.close_reason or 'no reason'})"
                )
            return {
                "first_s": state["first"],
                "wall_s": e["wall_s"],
                "audio_s": e["audio_s"],
                "server_ms": state["server"],
            }

    return await asyncio.gather(*(one(i) for i in range(n)))


@contextmanager
def endpoint(cfg, url: str | None = None) -> Iterator[tuple[str, dict]]:
    """``(url, its /healthz)`` of ``url``, an endpoint already running, or of the app this
    deploys on a local Ray from ``cfg`` (the local profile: the tiny model, CPU) and
    deletes on exit. Also used by bench/duplex.py."""
    import requests

    own = url is None
    if own:
        from serve_app.app import deploy
        from voxtral.ray_utils import init_ray

        init_ray()
        url = deploy(cfg)["url"]
    try:
        deadline, info = time.time() + 300, None
        while info is None:
            try:
                info = requests.get(url + "/healthz", timeout=10).json()
            except Exception:
                if time.time() > deadline:
                    raise TimeoutError(f"{url}/healthz did not answer for 300 s") from None
                time.sleep(1)
        yield url, info
    finally:
        if own:
            from ray import serve

            from serve_app.app import APP_NAME

            serve.delete(APP_NAME)


def run_stack(cfg, n: int, rounds: int, url: str | None = None) -> tuple[dict, dict]:
    """The full stack: websocket sessions against ``url`` (an endpoint already running),
    or against the app this function starts on a local Ray and deletes afterwards."""

    async def main(url: str, clip: np.ndarray):
        await ws_turns(url, cfg.serve.token, 1, clip)
        single = [r for _ in range(rounds) for r in await ws_turns(url, cfg.serve.token, 1, clip)]
        many = [r for _ in range(rounds) for r in await ws_turns(url, cfg.serve.token, n, clip)]
        return single, many

    with endpoint(cfg, url) as (url, info):
        if info.get("lm", {}).get("mode") == "full_duplex":
            raise SystemExit(
                f"{url} serves full duplex, which has no turns to time: measure it with "
                f"uv run bench/duplex.py --url {url}"
            )
        single, many = asyncio.run(main(url, speech()))
    firsts = [r["first_s"] * 1000 for r in many if r["first_s"] is not None]
    server = [r["server_ms"] for r in many if r["server_ms"] is not None]
    out = {
        "first_audio_ms_p50": percentile(firsts, 50),
        "first_audio_ms_p95": percentile(firsts, 95),
        "first_audio_ms_p50_1": percentile([r["first_s"] * 1000 for r in single], 50),
        "server_first_audio_ms_p50": percentile(server, 50),
        "rtf_1": rtf(single),
        "rtf_n": rtf(many),
    }
    return out, info


def main(argv=None) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--engine", action="store_true", help="model side only, no Ray")
    parser.add_argument("--base", choices=["tiny", *SHAPES], default="tiny")
    parser.add_argument("--sweep", type=int, default=0, help="engine: most sessions to try")
    parser.add_argument("--rtf-target", type=float, default=0.5)
    parser.add_argument("--url", help="measure this running endpoint instead of starting one")
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds of work")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.rounds = 2, 1
    if args.sweep and not args.engine:
        parser.error("--sweep measures the engine: add --engine")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="voxtral-bench-"))
    # half duplex (one stream) is what this measures: the local profile is full duplex
    overrides = [f"storage.root={root}", "serve.lead_ms=1000000", "tokenizer.streams=1"]
    if args.sweep:  # room for every session of the sweep on the one replica
        overrides.append(f"serve.max_sessions={max(args.sweep, args.sessions)}")
    overrides += args.overrides
    if args.base != "tiny":
        overrides.append(f"model.base={random_base(args.base, root / 'base')}")
    args.overrides = overrides
    cfg = config_from_args(args)
    if args.base != "tiny":  # export it like a trained model and serve that
        from voxtral.codec import codec_info
        from voxtral.model import build_speech_lm, export_speech_lm

        model, tok, layout = build_speech_lm(cfg)
        folder = export_speech_lm(
            model,
            tok,
            layout,
            root / "models" / f"random-{args.base}",
            codec=codec_info(cfg.codec),
        )
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": str(folder)})})
    if args.engine:
        figures, info = run_engine(cfg, args.sessions, args.rounds, args.sweep, args.rtf_target)
        device = info["device"]
    else:
        figures, info = run_stack(cfg, args.sessions, args.rounds, args.url)
        device = "cuda" if cfg.serve.num_gpus > 0 else "cpu"
    if device == "cuda":
        import torch

        device = f"cuda ({torch.cuda.get_device_name(0)})"
    result = {
        "device": device,
        "sessions": args.sessions,
        **figures,
        "mode": "engine" if args.engine else "stack",
        "base": args.base,
        "end_of_turn_ms": cfg.serve.end_of_turn_ms,
        "max_turn_s": cfg.serve.max_turn_s,
    }
    print(json.dumps(result), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
