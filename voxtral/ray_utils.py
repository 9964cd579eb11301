"""Ray at the edges: join the cluster this machine belongs to, else start a local one."""

from __future__ import annotations

import logging
import os
import socket

import ray
from ray._common.utils import get_ray_address_file

log = logging.getLogger("voxtral")

# The runtime environment every job declares (merged with a `ray job submit` one, which
# brings the working directory): environment variables tasks and actors need.
RUNTIME_ENV_VARS = {
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/voxtral-torch-ext"),
}


def recorded_cluster() -> str | None:
    """The GCS address that the last ``ray start`` on this machine wrote down (Ray's
    ``ray_current_cluster`` file), or None."""
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_alive(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts connections at ``host:port`` (a GCS that is up)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def init_ray(**kwargs) -> str:
    """Join the cluster this process belongs to, else start a local Ray; say which.

    ``RAY_ADDRESS`` (set by ``ray job submit``, or by the user) is joined as given. Otherwise
    the head that the last ``ray start`` recorded is joined only if its GCS still answers:
    plain ``ray.init()`` would wait forever on a head that was killed. A local Ray is private
    to this process, so it runs without Ray's token authentication unless ``RAY_AUTH_MODE``
    says otherwise; a cluster keeps whatever its head was started with. ``kwargs``
    (``num_cpus``, ``include_dashboard``, …) size a local Ray; a cluster has its own.
    """
    if ray.is_initialized():
        return "already connected to Ray"
    for key, value in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": {k: os.environ[k] for k in RUNTIME_ENV_VARS}}
    address, said = os.environ.get("RAY_ADDRESS") or None, ""
    if address is None:
        recorded = recorded_cluster()
        if recorded and is_alive(recorded):
            address = recorded
        elif recorded:
            said = f" (the cluster recorded at {recorded} does not answer)"
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", runtime_env=runtime_env, **kwargs)
        said = f"started a local Ray{said}"
    else:
        ray.init(address=address, runtime_env=runtime_env)
        said = f"joined the Ray cluster at {address}"
    ray.data.DataContext.get_current().enable_progress_bars = True
    log.info(said)
    return said


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
