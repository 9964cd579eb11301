"""Running the README's commands as a user types them: ``uv run …`` in a subprocess, with the
environment a user's shell would have, and a Ray head started the way a uv project starts one.

The environment handed to every command leaves out what this pytest process gained from
its own start-up (``RAY_ENABLE_UV_RUN_RUNTIME_ENV`` from the project's ``.pth`` file,
``RAY_ADDRESS``), so each command has to set up Ray by itself, as it would for a user. A
head keeps Ray's record of "the last ``ray start``" in a private ``RAY_TMPDIR``, so it
neither joins nor clobbers a cluster of the machine's own (this test session's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import psutil
import pytest

from voxtral.config import REPO_ROOT

UV = os.environ.get("UV") or shutil.which("uv") or "uv"
ENCODEC = ["codec.name=encodec", "codec.n_q=null", "codec.size=tiny", "tokenizer.group_ms=40"]
"""The local profile's codec before it moved to a tiny Mimi: EnCodec at 1.5 kbps, groups of
40 ms (3 frames of 2 codebooks). Tests written against that layout pin it (with
``tokenizer.streams=2``: 13 ids per group). Its tiny random size: the same rates, codebooks
and code path as the full one, which codes about ten times slower on a CPU (225 s of the
sample corpus, one thread: 25 s against 2.5 s) and which tests/test_codec.py covers. The
serving tests keep the full size (``serve_client``): their streaming codec checks hold it
to match rates measured on it."""
ONE_STREAM_ENCODEC = [*ENCODEC, "tokenizer.streams=1"]
"""The local profile as it was before it went full duplex (7 ids per group): the
half-duplex server and the tests of that layout pin it."""
EVERYTHING_FAST = ["train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=3"]
"""A short run of the local profile: its sample corpus, a few train steps."""


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.pop("RAY_ENABLE_UV_RUN_RUNTIME_ENV", None)
    return {**env, **extra}


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def uv_run(*args: str, env: dict[str, str], timeout: float) -> str:
    """``uv run ARGS`` from the repository root; its output, or a failure that shows it."""
    return run_command([UV, "run", *args], env=env, timeout=timeout)


def run_command(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """``argv`` from the repository root (``bash bench/gpu.sh``, say); its output, or a
    failure that shows it."""
    shown = " ".join(["uv" if argv[0] == UV else argv[0], *argv[1:]])
    try:
        out = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:], (exc.stderr or b"")[-3000:]
        pytest.fail(f"{shown}: no exit after {timeout} s\n{tail}")
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{shown} exited {out.returncode}\n{log[-5000:]}"
    return log


def json_line(output: str) -> dict:
    """The last line of the output that is a JSON object."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in:\n{output[-3000:]}")


def stage_summaries(output: str) -> dict[str, dict]:
    """``jobs/everything.py``'s ``== <stage>: done {json}`` lines → stage → summary."""
    done = {}
    for line in output.splitlines():
        if line.startswith("== ") and ": done {" in line:
            name, _, body = line[3:].partition(": done ")
            done[name] = json.loads(body)
    return done


@dataclass
class Head:
    env: dict[str, str]  # a user's environment whose Ray commands find this head
    tmp: str  # its RAY_TMPDIR
    dashboard: str  # where ``ray job submit`` goes
    metrics_port: int  # its node's Prometheus endpoint


def start_head(num_cpus: int = 2, dashboard: bool = True) -> Head:
    """``uv run ray start --head`` on free ports, with its own RAY_TMPDIR, sized as the
    smallest machine the README supports (2 cores): a plan that needs more CPUs than that
    to make progress hangs here as it would for a user. ``dashboard=False`` adds
    ``--include-dashboard=false``, for a head that is only there to be killed: the
    dashboard is most of a head's start (no job can be submitted to it).

    Every agent port is given: for a port left to the agent, the raylet waits for the
    agent to write it down and dies after a fixed 15 s (ray-project/ray#65983), which a
    loaded 2-core machine can take. A start that fails anyway is retried once."""
    from tests.serve_client import free_port

    for _ in range(2):
        ray_tmp = tempfile.mkdtemp(prefix="vxh-", dir="/tmp")  # socket paths must stay short
        env = user_env(RAY_TMPDIR=ray_tmp)
        ports = {
            "port": free_port(),
            "dashboard-port": free_port(),
            # 52365 (the agent's default HTTP port, where jobs are submitted) may be held by
            # another Ray on this machine, such as this test session's own.
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "runtime-env-agent-port": free_port(),
            "metrics-export-port": free_port(),
        }
        args = [f"--{k}={v}" for k, v in ports.items()]
        args += [f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        args += [] if dashboard else ["--include-dashboard=false"]
        out = subprocess.run(
            [UV, "run", "ray", "start", "--head", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        head = Head(
            env,
            ray_tmp,
            f"http://127.0.0.1:{ports['dashboard-port']}",
            ports["metrics-export-port"],
        )
        if out.returncode == 0:
            return head
        kill_head(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    pytest.fail(f"uv run ray start --head failed twice:\n{(out.stdout + out.stderr)[-4000:]}")


def kill_head(head: Head) -> None:
    """Every process of that head, at once, as a crash would (not ``ray stop``: it would stop
    every Ray of this machine, this test session's included). Its RAY_TMPDIR stays, with
    Ray's record of the dead head in it, as after a crash."""
    procs = head_processes(head.tmp)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.monotonic() + 30
    while any(_running(p) for p in procs):
        assert time.monotonic() < deadline, "the head's processes outlived SIGKILL"
        time.sleep(0.2)


def head_processes(tmp: str) -> list[psutil.Process]:
    """The processes of the Ray whose RAY_TMPDIR is ``tmp``: those that name it in their
    command line (the GCS, the raylet, the dashboard) or their environment (Ray's client
    server), and all their descendants. The raylet's agents rename themselves
    (``ray::DashboardAgent``) and keep nothing of it: matching command lines alone left
    them and the client server running, retrying the dead head, for the rest of the session
    and after it (three processes per head)."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "environ"]):
        named = tmp in " ".join(p.info["cmdline"] or ())
        if p.pid != os.getpid() and (named or (p.info["environ"] or {}).get("RAY_TMPDIR") == tmp):
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a killed orphan may wait a while to be reaped)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
