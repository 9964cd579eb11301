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
    # Ray Data 2.60 reads Parquet footers in 32 new actor processes per read_parquet. Our
    # stages read a few files per video (each actor reads 128 footers at once), and on a
    # small machine starting 32 Python processes cost ~10 s of every read: 2 are plenty.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
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
