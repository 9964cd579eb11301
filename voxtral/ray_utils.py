"""Ray at the edges: join the cluster this machine belongs to, else start a local one."""

from __future__ import annotations

import os

import ray

# The runtime environment every job declares (merged with a `ray job submit` one, which
# brings the working directory): environment variables tasks and actors need.
RUNTIME_ENV_VARS = {
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",  # see voxtral/__init__.py
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/voxtral-torch-ext"),
}


def init_ray(**kwargs) -> None:
    """``ray.init()``: it joins a running cluster (``RAY_ADDRESS``, ``ray start``, or the job
    this driver was submitted to) and otherwise starts a local Ray. No-op when connected."""
    if ray.is_initialized():
        return
    for key, value in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(key, value)
    env_vars = {k: os.environ[k] for k in RUNTIME_ENV_VARS}
    ray.init(runtime_env={"env_vars": env_vars}, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = True


def read_parquet(files: list[str], filesystem, columns: list[str] | None = None):
    """``ray.data.read_parquet`` with Ray Data's first Parquet reader. The second (2.60's
    default) starts 32 footer-reading actor processes per read, which on a small node costs
    more than the read itself (10–13 s on 2 cores, against under a second)."""
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=filesystem, columns=columns)
    finally:
        ctx.use_datasource_v2 = v2
