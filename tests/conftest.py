"""Shared fixtures: seeded random-init timm ViTs (no downloads), real sample photos."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from bench.results import loopback_s3
from pipeline.engine.models import ViT
from pipeline.extraction.weights import load_vit

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"

# One model per family the engine must handle: CLS-only p16, registers + p14, p8.
MODEL_NAMES = ("vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_small_patch8_224")


@functools.cache
def cached_vit(name: str, seed: int = 0) -> ViT:
    """Random init is deterministic per seed, so one instance per (name, seed) serves every test."""
    return load_vit(name, seed=seed, device="cpu")


@pytest.fixture(params=MODEL_NAMES)
def any_vit(request: pytest.FixtureRequest) -> ViT:
    return cached_vit(request.param)


@pytest.fixture
def tiny_vit() -> ViT:
    return cached_vit("vit_tiny_patch16_224")


def random_images(vit: ViT, rows: int, cols: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Normalized-looking images whose sides are `rows` x `cols` patches."""
    generator = torch.Generator().manual_seed(seed)
    p = vit.patch_size
    return torch.randn(batch, 3, rows * p, cols * p, generator=generator)


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    paths = sorted(SAMPLES.glob("*.jpg"))
    assert len(paths) >= 4, f"sample photos missing under {SAMPLES}"
    return paths


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback, bucket "bucket"; yields s3fs storage options."""
    with loopback_s3("bucket") as options:
        yield options


@pytest.fixture
def progress_bars(monkeypatch) -> list:
    """Every progress bar a run opens, each recording the steps it was moved by (a real tqdm)."""
    from tqdm import tqdm

    bars: list = []

    class RecordingBar(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.steps: list[float] = []
            bars.append(self)

        def update(self, n: float = 1) -> bool | None:
            self.steps.append(n)
            return super().update(n)

    monkeypatch.setattr("pipeline.extraction.progress.tqdm", RecordingBar)
    return bars
