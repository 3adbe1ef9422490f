"""cluster.yaml is a valid Ray cluster-launcher config, with GPU workers and token auth."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_own_schema():
    validate_config(prepare_config(load()))


def test_the_schema_check_is_real():
    broken = copy.deepcopy(load())
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # misspelt key
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_head_runs_no_work_gpu_workers_scale_and_token_auth_is_on():
    config = load()
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    worker = nodes["gpu_worker"]
    assert worker["min_workers"] == 0 < worker["max_workers"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("pip install" in c and "srt-pipeline" in c for c in config["setup_commands"])
