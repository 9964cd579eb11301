"""cluster.yaml is a valid Ray cluster-launcher config, pinned to the Ray this project locks."""

from __future__ import annotations

import copy
import re

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from voxtral.config import REPO_ROOT, load_config

CLUSTER = REPO_ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_can_fail(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["head"]["no_such_field"] = 1
    with pytest.raises(Exception, match="no_such_field"):
        validate_config(prepare_config(bad))


def test_image_matches_pinned_ray(cluster):
    tag = cluster["docker"]["image"].split(":", 1)[1]
    assert tag.startswith(ray.__version__ + "-"), (tag, ray.__version__)
    lock = (REPO_ROOT / "uv.lock").read_text()
    locked = re.search(r'name = "ray"\nversion = "([^"]+)"', lock).group(1)
    assert locked == ray.__version__


def test_node_types_cover_every_stage(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"].get("CPU") == 0
    gpu_types = [n for n, t in types.items() if t["node_config"]["InstanceType"][0] in "gp"]
    assert len(gpu_types) >= 2  # preprocess/serve GPUs and a training node
    assert all(t["max_workers"] >= t["min_workers"] for n, t in types.items() if "min_workers" in t)
    setup = "\n".join(cluster["setup_commands"])
    assert "uv" in setup and "-e ." in setup


def test_every_node_keeps_rays_token_authentication(cluster):
    """Ray turns token authentication on only when RAY_AUTH_MODE=token is in the environment
    of every `ray start`, with the same token on every node."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), (key, starts)
    assert cluster["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    assert "disabled" not in CLUSTER.read_text()


def test_real_run_profile_is_sized_for_the_cluster(cluster):
    cfg = load_config(REPO_ROOT / "configs" / "youtube-mistral7b.yaml", env={})
    assert cfg.storage.root.startswith(("s3://", "gs://"))  # shared by every node
    assert cfg.train.use_gpu and cfg.train.num_workers == 8  # one p4de.24xlarge
    assert cfg.codec.pretrained is True and cfg.index.source == "youtube"
    assert (REPO_ROOT / cfg.index.searches).is_file()
