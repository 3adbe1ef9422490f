"""`ray start --head` + token-authenticated `ray job submit` of the extraction job, end to end."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store.reader import FeatureStore

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head started by the CLI with token auth, its own token file; stopped afterwards."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    subprocess.run(
        [RAY, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_extracts_into_a_store(tmp_path, sample_paths, ray_head):
    env, address = ray_head
    out = tmp_path / "submitted.zarr"
    job = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
        "python", "jobs/extract.py", "--dataset", str(sample_paths[0].parent), "--out", str(out),
        "--model", "vit_tiny_patch16_224", "--image-size", "32", "--radius", "1", "--shard-size", "2",
    ]
    done = subprocess.run(job, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "succeeded" in log and "4 ok, 0 errors" in log
    store = FeatureStore.open(str(out))
    assert store.manifest.num_rows == 4 and set(store.manifest.column("status").to_pylist()) == {"ok"}
    assert store.dense(store.manifest.column("image_id")[0].as_py()).shape == (192, 4, 4)

    # A relative --out would land in Ray's temporary copy of the working directory: refused up front.
    relative = [*job[: job.index("--out") + 1], "try/job.zarr", *job[job.index("--out") + 2 :]]
    done = subprocess.run(relative, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "error: --out: try/job.zarr is relative" in done.stdout + done.stderr

    # `ray start` nodes have no autoscaler: actors they cannot place fail at once instead of waiting.
    crowded = [*job, "--num-actors", "3", "--cpus-per-actor", "1"]
    crowded[crowded.index("--out") + 1] = str(tmp_path / "crowded.zarr")  # a new store: a finished one would need no actors at all
    done = subprocess.run(crowded, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "3 actors of 1 CPUs each do not fit the cluster's 1 node(s) (2 CPUs): 2 fit, and it cannot grow" in done.stdout + done.stderr

    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=wrong, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Invalid authentication token" in refused.stdout + refused.stderr
