"""The README's commands, run as a user types them: ``uv run …`` in a subprocess, each bounded
in time. A README command that no test runs this way is not documented.

The environment handed to every command leaves out what this pytest process gained from
its own start-up (``RAY_ENABLE_UV_RUN_RUNTIME_ENV`` from the project's ``.pth`` file,
``RAY_ADDRESS``), so each command has to set up Ray by itself, as it would for a user. The
cluster tests keep Ray's record of "the last ``ray start``" in a private ``RAY_TMPDIR``, so
they neither join nor clobber a cluster of the machine's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from voxtral.config import REPO_ROOT
from voxtral.storage import Storage

pytestmark = pytest.mark.slow

UV = os.environ.get("UV") or shutil.which("uv") or "uv"
TWO_DIALOGUES = ("interview_en.mp3", "interview_en.vtt", "podcast_en.ogg", "podcast_en.vtt")
FAST_TRAIN = ["train.max_steps=2", "train.checkpoint_every=1", "train.eval_every=1"]


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.pop("RAY_ENABLE_UV_RUN_RUNTIME_ENV", None)
    return {**env, **extra}


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def uv_run(*args: str, env: dict[str, str], timeout: float) -> str:
    """``uv run ARGS`` from the repository root; its output, or a failure that shows it."""
    try:
        out = subprocess.run(
            [UV, "run", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:], (exc.stderr or b"")[-3000:]
        pytest.fail(f"uv run {' '.join(args)}: no exit after {timeout} s\n{tail}")
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"uv run {' '.join(args)} exited {out.returncode}\n{log[-5000:]}"
    return log


def json_line(output: str) -> dict:
    """The last line of the output that is a JSON object."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in:\n{output[-3000:]}")


def two_dialogue_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in TWO_DIALOGUES:
        shutil.copy(REPO_ROOT / "data" / "sample" / name, folder / name)
    return folder


# -- a head node started the way a uv project starts one ------------------------------------
@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``uv run ray start --head`` on free ports, with its own RAY_TMPDIR; killed at the end."""
    from tests.serve_client import free_port

    ray_tmp = tempfile.mkdtemp(prefix="vxh-", dir="/tmp")  # Ray's socket paths must stay short
    env = user_env(RAY_TMPDIR=ray_tmp)
    gcs, dash, agent = free_port(), free_port(), free_port()
    uv_run(
        "ray",
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        # 52365 (the agent's default HTTP port, where jobs are submitted) may be held by
        # another Ray on this machine, such as this test session's own.
        f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=4",
        "--disable-usage-stats",
        env=env,
        timeout=180,
    )
    yield {"env": env, "tmp": ray_tmp, "dashboard": f"http://127.0.0.1:{dash}"}
    kill_head(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def kill_head(ray_tmp: str) -> None:
    """Every process of that head, at once, as a crash would (not ``ray stop``: it would stop
    every Ray of this machine, this test session's included)."""
    subprocess.run(["pkill", "-9", "-f", ray_tmp], timeout=60)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the head's processes outlived SIGKILL"
        time.sleep(0.5)


def test_everything_no_serve_on_two_dialogues_joins_the_running_head(head, tmp_path):
    """``uv run jobs/everything.py --no-serve``: every stage, driver under ``uv run``, on the
    head that ``uv run ray start`` left running (its workers start from the project's
    environment, not from a fresh one that ``uv run`` would build)."""
    root = tmp_path / "run"
    corpus = two_dialogue_corpus(tmp_path / "corpus")
    log = uv_run(
        "jobs/everything.py",
        "--no-serve",
        *sets(f"storage.root={root}", f"index.local_dir={corpus}", *FAST_TRAIN),
        env=head["env"],
        timeout=900,
    )
    assert "== ray: joined the Ray cluster" in log, log[-3000:]
    for stage in ("index", "scrape", "preprocess", "train"):
        assert f"== {stage}: done" in log, (stage, log[-3000:])
    s = Storage(root)
    assert len(s.read_table("index")) == 2
    assert s.read_table("tokens", columns=["chunk_id"]) is not None
    assert any(s.exists("models", d, "voxtral.json") for d in s.listdir("models"))


def test_ray_job_submit_of_a_stage_to_the_head(head, tmp_path):
    """``uv run ray job submit --working-dir . -- python jobs/index.py``: the job supervisor
    and the driver run on workers of a head started through ``uv run``."""
    root = tmp_path / "run"
    corpus = two_dialogue_corpus(tmp_path / "corpus")
    log = uv_run(
        "ray",
        "job",
        "submit",
        f"--address={head['dashboard']}",
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/index.py",
        *sets(f"storage.root={root}", f"index.local_dir={corpus}"),
        env=head["env"],
        timeout=300,
    )
    assert "succeeded" in log.lower(), log[-3000:]
    assert len(Storage(root).read_table("index")) == 2


def test_serve_job_after_the_head_died(head, tmp_path):
    """``uv run jobs/serve.py`` on a machine whose recorded head was killed: it says so,
    starts a local Ray instead of waiting on the dead one, and serves; ``bench/serve.py
    --url`` measures it; Ctrl-C ends it."""
    from tests.serve_client import free_port, wait_healthy

    kill_head(head["tmp"])
    port = free_port()
    cmd = [UV, "run", "jobs/serve.py", *sets(f"storage.root={tmp_path / 'run'}")]
    cmd += sets(f"serve.port={port}")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=head["env"], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, timeout=300)
        assert health["ok"] and health["model_source"] == "tiny-random", health
        assert asyncio.run(handshake(url)), "no handshake"
        said = log_path.read_text()
        assert "started a local Ray (the cluster recorded at" in said, said[-3000:]
        bench = json_line(
            uv_run("bench/serve.py", "--quick", "--url", url, env=user_env(), timeout=300)
        )
        assert bench["sessions"] == 2 and bench["first_audio_ms_p50"] > 0, bench
        assert 0 < bench["rtf_1"] < 100 and 0 < bench["rtf_n"] < 100, bench
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code in (0, -signal.SIGINT, 130), (code, log_path.read_text()[-3000:])


async def handshake(url: str) -> bool:
    from serve_app import protocol as P
    from tests.serve_client import connect

    client = await connect(url, codec="pcm16", token=None)
    try:
        return await client.wait_for(lambda: client.of_kind(P.Kind.HANDSHAKE), 60)
    finally:
        await client.ws.close()


# -- every bench script, in its --quick mode ------------------------------------------------
BENCH_KEYS = {
    "tokenizer": {"codec", "encode_xrt", "decode_xrt"},
    "train": {"tokens_per_s_per_worker", "mfu", "zero_stage"},
    "preprocess": {"xrt", "codec_xrt", "efficiency", "first_codes_s"},
    "scrape": {"xrt", "xrt_per_core", "peak_rss_mb_3h", "speedup_vs_sequential"},
}


@pytest.mark.parametrize("name", sorted(BENCH_KEYS))
def test_bench_quick_prints_its_json_line(name):
    """``uv run bench/NAME.py --quick`` (``bench/serve.py`` runs above, against a live
    endpoint): it ends with one JSON line carrying its keys, and every figure is a number."""
    figures = json_line(uv_run(f"bench/{name}.py", "--quick", env=user_env(), timeout=400))
    missing = BENCH_KEYS[name] - set(figures)
    assert not missing, (missing, figures)
    for key in BENCH_KEYS[name] - {"codec", "mfu"}:
        assert isinstance(figures[key], int | float) and figures[key] >= 0, (key, figures)


def test_quick_inner_loop_leaves_out_the_slow_tests():
    """``uv run pytest -m "not slow"`` (the README's inner loop) selects tests, and none of
    the end-to-end ones; collected only, since running it here would run the suite twice."""
    out = uv_run("pytest", "-m", "not slow", "--collect-only", "-q", env=user_env(), timeout=300)
    ids = [line for line in out.splitlines() if "::" in line]
    assert len(ids) > 100, out[-2000:]
    assert not [i for i in ids if i.startswith(("tests/test_readme.py", "tests/test_pipeline.py"))]
