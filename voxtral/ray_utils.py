"""Ray at the edges: connect to the cluster this machine belongs to, else start a local one."""

from __future__ import annotations

import os

import ray

from voxtral.config import REPO_ROOT


def init_ray(**kwargs) -> None:
    """``ray.init()`` that joins a running cluster (``RAY_ADDRESS`` or ``ray start``) when
    there is one and otherwise starts a local Ray; a no-op when already connected."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = kwargs.pop("runtime_env", None) or {}
    env_vars = {"PYTHONPATH": str(REPO_ROOT), **runtime_env.get("env_vars", {})}
    runtime_env = {**runtime_env, "env_vars": env_vars}
    ray.init(runtime_env=runtime_env, log_to_driver=True, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
