"""Shared fixtures: a local Ray for the whole session and per-test pipeline configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "voxtral-torch-ext"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from voxtral.config import DEFAULT_CONFIG, Config, load_config  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the session's Ray (through the fixture below) as ``ray``,
    so ``-m "not ray"`` selects the tests that run without a cluster."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


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


@pytest.fixture
def local_cfg(tmp_path) -> Config:
    """configs/local.yaml with storage under this test's temporary folder."""
    return load_config(DEFAULT_CONFIG, [f"storage.root={tmp_path / 'run'}"], env={})
