"""Shared fixtures: a local Ray for the whole session and per-test pipeline configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "voxtral-torch-ext"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from voxtral.config import DEFAULT_CONFIG, Config, load_config  # noqa: E402

SERVING_MODULES = (
    "test_browser",
    "test_duplex_serve",
    "test_hostile",
    "test_serve",
    "test_turn_taking",
)
"""The modules that talk to the Serve applications of ``tests/serve_client.py``, deployed
once per test process. They run last and together: a module between them that ends Serve
(``test_pipeline`` serves its own model) or Ray (``test_scrape``'s cluster of two nodes)
would make the next one deploy both again, 20-30 s each."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the session's Ray (through the fixture below) as ``ray``,
    so ``-m "not ray"`` selects the tests that run without a cluster; move the serving
    modules to the end, in their order."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: item.path.stem in SERVING_MODULES)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the test session (4 logical CPUs on 2 cores, so a 2-worker train
    run still leaves room for its Ray Data tasks). Tests that need their own cluster call
    ``ray.shutdown()`` and leave it shut; this fixture re-inits on next use."""
    import ray

    from voxtral.ray_utils import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=4, include_dashboard=False)
    yield ray


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's in-process references, as the 1-CPU actors run:
    the thread count changes float rounding, and the 2 cores are not fought over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def local_cfg(tmp_path) -> Config:
    """configs/local.yaml with storage under this test's temporary folder."""
    return load_config(DEFAULT_CONFIG, [f"storage.root={tmp_path / 'run'}"], env={})


@pytest.fixture(scope="session")
def ray_head():
    """A head started as the README starts one (``uv run ray start --head``), for the
    session's command tests; killed at the end."""
    from tests.commands import kill_head, start_head

    head = start_head()
    yield head
    kill_head(head)
    shutil.rmtree(head.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def everything_run(ray_head, tmp_path_factory) -> tuple[Path, str, dict[str, dict]]:
    """``uv run jobs/everything.py --no-serve`` once per session, on that head: (storage
    root, output, stage → summary). The README test and the end-to-end checks share it."""
    from tests.commands import EVERYTHING_FAST, sets, stage_summaries, uv_run

    root = tmp_path_factory.mktemp("everything") / "run"
    log = uv_run(
        "jobs/everything.py",
        "--no-serve",
        *sets(f"storage.root={root}", *EVERYTHING_FAST),
        env=ray_head.env,
        timeout=1200,
    )
    return root, log, stage_summaries(log)
