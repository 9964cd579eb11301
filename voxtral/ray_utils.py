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


def cluster_to_join() -> tuple[str | None, str]:
    """The address ``init_ray`` joins (None: start a local Ray), and why, in words.

    ``RAY_ADDRESS`` (set by ``ray job submit``, or by the user) is taken as given. Otherwise
    the head that the last ``ray start`` recorded is taken only if its GCS still answers:
    plain ``ray.init()`` would wait forever on a head that was killed.
    """
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    recorded = recorded_cluster()
    if recorded is None:
        return None, "no cluster recorded on this machine"
    if is_alive(recorded):
        return recorded, "the last `ray start` on this machine"
    return None, f"the cluster recorded at {recorded} does not answer"


def init_ray(**kwargs) -> str:
    """Join the cluster this process belongs to (:func:`cluster_to_join`), else start a local
    Ray; return what it did, for the job to print.

    A local Ray lives and dies with this process and defaults to ``RAY_AUTH_MODE=disabled``
    (the embedded run, the tests); export ``RAY_AUTH_MODE=token`` to keep Ray's token
    authentication on there too. A cluster keeps whatever its head was started with.
    ``kwargs`` (``num_cpus``, ``include_dashboard``, …) size a local Ray; a cluster has its own.
    """
    if ray.is_initialized():
        return "already connected to Ray"
    for key, value in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": {k: os.environ[k] for k in RUNTIME_ENV_VARS}}
    address, why = cluster_to_join()
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", runtime_env=runtime_env, **kwargs)
        said = f"started a local Ray ({why})"
    else:
        ray.init(address=address, runtime_env=runtime_env)
        said = f"joined the Ray cluster at {address} ({why})"
    # Ray Data's documented switch (its DataContext is per driver process by design): the
    # stage jobs show progress bars, even where RAY_DATA_DISABLE_PROGRESS_BARS is set.
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
