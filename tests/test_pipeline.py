"""End to end: `uv run jobs/everything.py --no-serve` on the local profile (run once per
session on a `uv run ray start` head, see ``everything_run`` in conftest), its rerun,
serving what it trained, and the dashboard metrics."""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import time
import urllib.request

import numpy as np
import pytest

from tests.commands import ENCODEC, EVERYTHING_FAST, sets
from voxtral.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from voxtral.storage import Storage

pytestmark = pytest.mark.slow


def _everything(root) -> dict:
    """``jobs/everything.py --no-serve`` again, in this process on the session's Ray."""
    main = runpy.run_path(str(REPO_ROOT / "jobs" / "everything.py"), run_name="everything")["main"]
    return main(["--no-serve", *sets(f"storage.root={root}", *EVERYTHING_FAST)])


@pytest.fixture(scope="module")
def pipeline_root(everything_run):
    root, _log, summaries = everything_run
    return root, summaries


def test_everything_produces_every_stage_output(pipeline_root):
    root, summaries = pipeline_root
    assert list(summaries) == ["index", "scrape", "preprocess", "train"]
    s = Storage(root)
    index = s.read_table("index")
    assert index is not None and len(index) == summaries["index"]["new"] > 0
    assert summaries["scrape"]["done"] == len(index) and summaries["scrape"]["failed"] == 0
    chunks = s.read_table("chunks", columns=["chunk_id", "video_id"])
    assert set(chunks.column("video_id").to_pylist()) == set(index.column("video_id").to_pylist())
    # two streams: an example per main speaker of every diarised dialogue chunk
    tokens = s.read_table("tokens", columns=["chunk_id", "model_speaker"]).to_pylist()
    assert {r["chunk_id"] for r in tokens} == set(chunks.column("chunk_id").to_pylist())
    assert len({(r["chunk_id"], r["model_speaker"]) for r in tokens}) == len(tokens)
    assert len(tokens) > len(chunks)
    assert s.listdir("train"), "no training checkpoints"
    model_dir = summaries["train"]["export"]
    meta = json.loads(open(os.path.join(model_dir, "voxtral.json")).read())
    assert (meta["layout"]["codec"], meta["layout"]["streams"]) == ("mimi", 2), meta["layout"]
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))


def test_rerun_does_no_new_work(pipeline_root, ray_session):
    root, _ = pipeline_root
    again = _everything(root)
    assert again["index"]["new"] == 0
    assert again["scrape"]["attempted"] == 0
    assert again["preprocess"]["chunks"] == 0
    assert again["train"].get("skipped"), again["train"]


def test_serves_the_model_this_run_trained(pipeline_root, ray_session, request):
    from serve_app.app import deploy
    from tests.serve_client import connect, free_port, speech_clip, wait_healthy

    root, summaries = pipeline_root
    port = free_port()
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            f"storage.root={root}",
            f"serve.port={port}",
            "serve.max_turn_s=1.5",
            "serve.end_of_turn_ms=300",
        ],
        env={},
    )
    from ray import serve

    serve.shutdown()  # Serve's HTTP port is fixed when it starts: start it on ours
    request.addfinalizer(serve.shutdown)  # and leave none behind for other tests
    url = deploy(cfg)["url"]
    health = wait_healthy(url)
    assert health["model_source"] == "trained" and health["lm"]["mode"] == "full_duplex"
    assert os.path.realpath(health["model"]) == os.path.realpath(summaries["train"]["export"])

    async def talk() -> int:
        from serve_app import protocol as P

        client = await connect(url, codec="pcm16", token=None)
        try:
            assert await client.wait_for(lambda: client.of_kind(P.Kind.HANDSHAKE), 60)
            speech = speech_clip(root)
            await client.send_audio(np.concatenate([speech, np.zeros(24000, np.float32)]))
            await client.wait_for(lambda: len(client.of_kind(P.Kind.AUDIO)) > 1, 90)
            return len(client.of_kind(P.Kind.AUDIO))
        finally:
            await client.ws.close()

    assert asyncio.run(talk()) > 1


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_stage_metrics_reach_the_dashboard_endpoint(pipeline_root, ray_head):
    """Every stage's counters, as the head node's Prometheus endpoint exports them."""
    ports = {ray_head.metrics_port}
    wanted = [
        "ray_voxtral_index_videos",
        "ray_voxtral_scrape_videos",
        "ray_voxtral_preprocess_chunks",
        "ray_voxtral_train_tokens",
    ]
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = "".join(_scrape(p) for p in ports)
        if all(w in text for w in wanted):
            break
        time.sleep(3)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"metrics not exported: {missing}"


def test_a_config_train_would_refuse_fails_before_the_first_stage(tmp_path):
    """Two streams of EnCodec make 13-token groups: the local profile's seq_len (1051, 210
    groups of 5) is refused before index runs (not after minutes of scrape and preprocess),
    and the error names the key and a value that fits."""
    from voxtral.config import ConfigError
    from voxtral.pipeline import run_stages

    cfg = load_config(
        DEFAULT_CONFIG,
        [f"storage.root={tmp_path / 'run'}", *ENCODEC, "tokenizer.streams=2"],
        env={},
    )
    with pytest.raises(ConfigError, match=r"train.seq_len=1051 .* e\.g\. 1054"):
        run_stages(cfg)
    assert not (tmp_path / "run").exists()  # nothing ran
    run_stages(cfg, stages=())  # the check is the train stage's: without it, nothing to refuse
