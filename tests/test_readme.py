"""The README's commands, run as a user types them: ``uv run …`` in a subprocess, each bounded
in time (see tests/commands.py). A README command that no test runs this way is not
documented.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.commands import (
    UV,
    json_line,
    kill_head,
    run_command,
    sets,
    start_head,
    user_env,
    uv_run,
)
from voxtral.codec import codec_info
from voxtral.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from voxtral.layout import make_layout
from voxtral.storage import Storage

pytestmark = pytest.mark.slow

TWO_DIALOGUES = ("interview_en.mp3", "interview_en.vtt", "podcast_en.ogg", "podcast_en.vtt")


def two_dialogue_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in TWO_DIALOGUES:
        shutil.copy(REPO_ROOT / "data" / "sample" / name, folder / name)
    return folder


def test_everything_no_serve_joins_the_running_head(everything_run):
    """``uv run jobs/everything.py --no-serve``: every stage, driver under ``uv run``, on the
    head that ``uv run ray start`` left running (its workers start from the project's
    environment, not from a fresh one that ``uv run`` would build). What the run made is
    checked in tests/test_pipeline.py."""
    root, log, summaries = everything_run
    assert "== ray: joined the Ray cluster" in log, log[-3000:]
    assert list(summaries) == ["index", "scrape", "preprocess", "train"], log[-3000:]
    for title in ("index summary", "scrape summary", "preprocess summary", "train summary"):
        assert title in log, (title, log[-3000:])
    s = Storage(root)
    assert s.read_table("tokens", columns=["chunk_id"]) is not None
    assert any(s.exists("models", d, "voxtral.json") for d in s.listdir("models"))


def test_ray_job_submit_of_a_stage_to_the_head(ray_head, tmp_path):
    """``uv run ray job submit --working-dir . -- python jobs/index.py``: the job supervisor
    and the driver run on workers of a head started through ``uv run``."""
    root = tmp_path / "run"
    corpus = two_dialogue_corpus(tmp_path / "corpus")
    log = uv_run(
        "ray",
        "job",
        "submit",
        f"--address={ray_head.dashboard}",
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/index.py",
        *sets(f"storage.root={root}", f"index.local_dir={corpus}"),
        env=ray_head.env,
        timeout=300,
    )
    assert "succeeded" in log.lower(), log[-3000:]
    assert len(Storage(root).read_table("index")) == 2


def test_serve_job_after_the_head_died(tmp_path):
    """``uv run jobs/serve.py`` on a machine whose recorded head was killed: it says so,
    starts a local Ray instead of waiting on the dead one, and serves the local profile full
    duplex; ``bench/serve.py --url``, which times half-duplex turns, says to use
    bench/duplex.py instead (which tests/test_duplex_serve.py runs); Ctrl-C ends it."""
    from tests.serve_client import free_port, wait_healthy

    # its own (the session's head stays up for other tests), with no dashboard: it is killed
    # at once, and what the job finds is the same, a head recorded whose GCS does not answer
    head = start_head(num_cpus=1, dashboard=False)
    kill_head(head)
    port = free_port()
    cmd = [UV, "run", "jobs/serve.py", *sets(f"storage.root={tmp_path / 'run'}")]
    cmd += sets(f"serve.port={port}")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=head.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=ctrl_c_as_in_a_terminal,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, timeout=300)
        assert health["ok"] and health["model_source"] == "tiny-random", health
        assert health["lm"]["mode"] == "full_duplex", health
        assert asyncio.run(handshake(url)), "no handshake"
        said = log_path.read_text()
        assert "started a local Ray (the cluster recorded at" in said, said[-3000:]
        bench = subprocess.run(
            [UV, "run", "bench/serve.py", "--quick", "--url", url],
            cwd=REPO_ROOT,
            env=user_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bench.returncode != 0 and f"uv run bench/duplex.py --url {url}" in bench.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            kill_head(head)  # the local Ray that jobs/serve.py started kept its files there too
            shutil.rmtree(head.tmp, ignore_errors=True)
    assert code in (0, -signal.SIGINT, 130), (code, log_path.read_text()[-3000:])


def ctrl_c_as_in_a_terminal() -> None:
    """SIGINT back to its default in the child, as a shell gives it to a command it runs in
    the foreground: a test session started in the background (``uv run pytest &``) ignores
    SIGINT, every child inherits that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def handshake(url: str) -> bool:
    from serve_app import protocol as P
    from tests.serve_client import connect

    client = await connect(url, codec="pcm16", token=None)
    try:
        return await client.wait_for(lambda: client.of_kind(P.Kind.HANDSHAKE), 60)
    finally:
        await client.ws.close()


# -- the bench scripts, in their --quick mode ------------------------------------------------
# bench/serve.py runs in tests/test_serve.py (against the shared half-duplex endpoint),
# bench/duplex.py in tests/test_turn_taking.py and tests/test_duplex_serve.py (against
# either mode's endpoint); tokenizer, preprocess and train run in
# the GPU script's dry run below, each as ``python bench/NAME.py --device cpu --quick`` under
# ``uv run`` (checked there against these keys), so they are not run a second time here.
BENCH_KEYS = {
    "tokenizer": {"codec", "encode_xrt", "decode_xrt"},
    "train": {"tokens_per_s_per_worker", "mfu", "zero_stage"},
    "preprocess": {"xrt", "codec_xrt", "efficiency", "first_codes_s"},
    "scrape": {"xrt", "xrt_per_core", "peak_rss_mb_3h", "speedup_vs_sequential"},
    "asr": {"asr_xrt", "asr_xrt_alone", "asr_batch_speedup", "diarize_xrt", "der"},
}


def assert_numbers(figures: dict, keys: set[str]) -> None:
    """Every key is there, and each figure (beyond names and CPU's null MFU) is a number."""
    missing = keys - set(figures)
    assert not missing, (missing, figures)
    for key in keys - {"codec", "mfu"}:
        assert isinstance(figures[key], int | float) and figures[key] >= 0, (key, figures)


@pytest.mark.parametrize("name", ["scrape", "asr"])
def test_bench_quick_prints_its_json_line(name):
    """``uv run bench/NAME.py --quick``: it ends with one JSON line carrying its keys."""
    figures = json_line(uv_run(f"bench/{name}.py", "--quick", env=user_env(), timeout=400))
    assert_numbers(figures, BENCH_KEYS[name])
    if name == "asr":  # the sample dialogue's turns are found (issue 12: DER <= 10 %)
        assert figures["der"] <= 0.10 and figures["asr_words"] > 0, figures


# -- the lent-GPU script, rehearsed on CPU -----------------------------------------------------
GPU_FIGURES = {  # issue 14's figures, each line's keys (null when skipped)
    "tokenizer": {"codec", "encode_xrt"},
    "precision": {"zero_stage", "master_dtype", "module_dtype", "export_round_trip"},
    "preprocess": {"efficiency", "codec_xrt"},
    "serve": {"first_audio_ms_p50", "sessions_at_rtf_0.5"},
    "train": {"model", "zero_stage", "attention", "mfu", "tokens_per_s_per_worker"},
    "run": {"wall_s", "errors", "skipped"},
}


@pytest.mark.timeout(1500)
def test_gpu_script_dry_run_prints_every_figure():
    """``bash bench/gpu.sh --dry-run``: every step of the GPU run, on CPU with tiny shapes.
    One JSON line per figure with its keys; no step fails; the bf16 path keeps fp32 masters
    and its export round-trips; every attention kernel of the matrix has its line (those
    that cannot train on CPU say why), on ZeRO-2 and -3, and so do checkpointing and compile."""
    out = run_command(["bash", "bench/gpu.sh", "--dry-run"], env=user_env(), timeout=1400)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_figure: dict[str, list[dict]] = {}
    for line in lines:
        missing = GPU_FIGURES[line["figure"]] - set(line)
        assert not missing, (missing, line)
        by_figure.setdefault(line["figure"], []).append(line)
    assert set(by_figure) == set(GPU_FIGURES), sorted(by_figure)
    run = by_figure["run"][0]
    assert run["errors"] == 0, [x for x in lines if "error" in x]
    assert {(x["codec"], x["encode_xrt"] > 0) for x in by_figure["tokenizer"]} == {
        ("encodec", True),
        ("mimi", True),
    }
    precision = {x["zero_stage"]: x for x in by_figure["precision"]}
    assert set(precision) == {2, 3}
    for x in precision.values():
        assert (x["module_dtype"], x["master_dtype"]) == ("bfloat16", "float32"), x
        assert x["module_is_rounded_master"] is True and x["export_round_trip"] is True, x
    for name in ("tokenizer", "preprocess"):
        for x in by_figure[name]:
            assert_numbers(x, BENCH_KEYS[name])
    for x in by_figure["train"] + by_figure["precision"]:
        if not x.get("skipped"):
            assert_numbers(x, BENCH_KEYS["train"])
    assert by_figure["preprocess"][0]["efficiency"] > 0
    assert by_figure["serve"][0]["first_audio_ms_p50"] > 0
    assert by_figure["serve"][0]["sessions_at_rtf_0.5"] >= 0
    local = load_config(DEFAULT_CONFIG, [], env={})
    group = make_layout(codec_info(local.codec), 32000, local.tokenizer).group_len
    matrix = {(x["zero_stage"], x["attention"]): x for x in by_figure["train"][:6]}
    assert set(matrix) == {(z, a) for z in (2, 3) for a in ("sdpa", "flex", "flash_varlen")}
    for (_, attention), x in matrix.items():
        if attention == "sdpa":
            assert x["tokens_per_s_per_worker"] > 0 and x["mfu"] is None, x  # no MFU on CPU
            # the plan's round window (1000), rounded down to <bos> + whole groups
            assert 1000 - group < x["seq_len"] <= 1000 and (x["seq_len"] - 1) % group == 0, x
        else:
            assert x["tokens_per_s_per_worker"] is None and "CUDA" in x["skipped"], x
    extras = by_figure["train"][6:]
    assert [(x["grad_checkpointing"], x["compile"]) for x in extras] == [
        (True, False),
        (False, True),
    ]
    assert all(x["tokens_per_s_per_worker"] > 0 for x in extras), extras


def test_quick_inner_loop_leaves_out_the_slow_tests():
    """``uv run pytest -m "not slow"`` (the README's inner loop) selects tests, and none of
    the end-to-end ones; collected only, since running it here would run the suite twice."""
    out = uv_run("pytest", "-m", "not slow", "--collect-only", "-q", env=user_env(), timeout=300)
    ids = [line for line in out.splitlines() if "::" in line]
    assert len(ids) > 100, out[-2000:]
    assert not [i for i in ids if i.startswith(("tests/test_readme.py", "tests/test_pipeline.py"))]


def test_compile_bytecode_once_where_python_caches_none():
    """``uv sync --compile-bytecode``, the README's step for machines that set
    PYTHONDONTWRITEBYTECODE (this project's CI): afterwards a process there loads torch, Ray,
    DeepSpeed and transformers from cached bytecode instead of compiling them as it starts."""
    run_command([UV, "sync", "--compile-bytecode"], env=user_env(), timeout=600)
    check = (
        "import importlib.util, os, torch, ray, deepspeed, transformers; "
        "print('uncached:', sorted(m.__name__ for m in (torch, ray, deepspeed, transformers) "
        "if not os.path.exists(importlib.util.cache_from_source(m.__file__))))"
    )
    out = uv_run("python", "-c", check, env=user_env(PYTHONDONTWRITEBYTECODE="1"), timeout=300)
    assert "uncached: []" in out.splitlines(), out[-2000:]
