"""Device-aware defaults: the views-per-pass budget, images per SRT call, GPU actors' CPU share."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.engine.accelerator import MAX_VIEWS_PER_FORWARD, HostBuffers, ViewBudget, autocast_dtype, view_budget
from pipeline.engine.srt import DEFAULT_BATCH_SIZE, SRT
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import images_per_call


def test_a_fitted_budget_gives_larger_inputs_fewer_views_and_halves_after_running_out():
    budget = ViewBudget(fixed=None, bytes_per_token=1e4, memory=1e9)
    assert budget.views((224, 224), 16) == 510  # 1e9 / (1e4 * 196 tokens)
    assert budget.views((448, 448), 16) == 127
    assert budget.views((32, 32), 16) == MAX_VIEWS_PER_FORWARD
    budget.halve()
    assert budget.views((448, 448), 16) == 63
    tiny = ViewBudget(fixed=None, bytes_per_token=1e9, memory=1.0)
    assert tiny.views((448, 448), 16) == 1  # never zero views


def test_a_requested_batch_size_is_kept_until_memory_runs_out():
    budget = ViewBudget(fixed=24)
    assert budget.views((448, 448), 16) == 24
    budget.halve()
    budget.halve()
    assert budget.views((224, 224), 16) == 6


def test_cpu_keeps_its_defaults():
    import torch

    vit = load_vit("vit_small_patch16_224", device="cpu")
    srt = SRT(vit, shifts=[(0, 0), (4, 4)], stride=8)
    assert view_budget(srt, 0, (224, 224)) == ViewBudget(fixed=DEFAULT_BATCH_SIZE)
    assert view_budget(srt, 40, (224, 224)) == ViewBudget(fixed=40)
    assert autocast_dtype("auto", torch.device("cpu")) is None  # CPU runs fp32 whatever --precision says
    assert autocast_dtype("bf16", torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("batch_size", "views", "expected"),
    [
        (16, 16, 1),  # one image's views fill a pass
        (16, 25, 8),  # lcm(16, 25) / 25 = 16 images would be needed: bounded at 8
        (64, 16, 4),
        (0, 16, 16),  # auto: 256 views per call
        (0, 25, 11),  # at least ceil(256 / 25)
        (100, 3, 34),  # ceil(100 / 3) beats the bound of 8
    ],
)
def test_images_per_call_fill_the_forward_passes(batch_size, views, expected):
    assert images_per_call(batch_size, views) == expected


@pytest.mark.timeout(120)
def test_gpu_actors_get_their_gpus_share_of_the_node_cpus():
    """A real Ray instance that declares 2 GPUs and 6 CPUs (the actors are only planned, not started)."""
    script = """
import ray
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.placement import actor_plan, cluster_nodes
ray.init(num_cpus=6, num_gpus=2, include_dashboard=False, log_to_driver=False)
base = dict(dataset="d", out="o", model="vit_small_patch16_224")
print(actor_plan(ExtractConfig(**base), *cluster_nodes()))
print(actor_plan(ExtractConfig(**base, gpus_per_actor=0.5), *cluster_nodes()))
print(actor_plan(ExtractConfig(**base, cpus_per_actor=1), *cluster_nodes()))
ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-3:] == [
        "(2, {'num_gpus': 1.0, 'num_cpus': 3}, 3)",
        "(4, {'num_gpus': 0.5, 'num_cpus': 1}, 1)",
        "(2, {'num_gpus': 1.0, 'num_cpus': 1}, 1)",
    ]


def test_host_buffers_are_reused_up_to_their_byte_budget(monkeypatch):
    buffers = HostBuffers(torch.device("cpu"))
    monkeypatch.setattr(HostBuffers, "KEPT_BYTES", 3 * 800)
    first = [buffers.take((10, 20), np.dtype("float32")) for _ in range(4)]  # 800 bytes each
    buffers.give(first)
    assert buffers.kept == 3 * 800  # the fourth is let go
    again = [buffers.take((10, 20), np.dtype("float32")) for _ in range(4)]
    assert sum(any(a is b for b in first) for a in again) == 3 and buffers.kept == 0
    assert buffers.take((10, 20), np.dtype("float16")).dtype == np.float16  # another dtype: a new buffer


def test_a_request_only_a_grown_cluster_holds_waits_and_one_no_cluster_holds_fails_naming_the_flags(caplog):
    from pipeline.extraction.flags import ConfigError
    from pipeline.extraction.config import ExtractConfig
    from pipeline.extraction.placement import actor_plan

    base = dict(dataset="d", out="o", model="vit_small_patch16_224")
    head = [{"CPU": 2.0}]
    with pytest.raises(ConfigError, match=r"--num-actors, --cpus-per-actor: 3 actors of 1 CPUs each do not fit .* cannot grow"):
        actor_plan(ExtractConfig(**base, num_actors=3, cpus_per_actor=1), head, None)
    workers = [{"CPU": 8.0, "GPU": 1.0}] * 2  # what the autoscaler may add
    assert actor_plan(ExtractConfig(**base, num_actors=2), [{"CPU": 0.0}], workers) == (2, {"num_gpus": 1.0, "num_cpus": 1}, 1)
    assert "waiting for the autoscaler to add nodes (it may add 2)" in caplog.text
    with pytest.raises(ConfigError, match=r"nor at the largest its autoscaler may make it \(2 more nodes\)"):
        actor_plan(ExtractConfig(**base, num_actors=3), [{"CPU": 0.0}], workers)
