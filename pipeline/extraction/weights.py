"""Model weights named by URI: read a checkpoint through fsspec into the engine's ViT, and the
provenance string of a weights choice without building the model.

The engine builds models from bytes and never touches a filesystem; this module is where a
checkpoint URI (local, s3://, gs://, http(s)://) becomes those bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec
import torch

from pipeline.engine.models import ViT, build_vit, check_same_model, checkpoint_id, hub_or_seed_id, seed_of
from pipeline.store.uris import read_uri


def load_vit(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ViT:
    """`build_vit` with the checkpoint read from `weights`, a URI on any fsspec filesystem."""
    if pretrained and weights:
        raise ValueError("give either pretrained=True or weights=URI, not both")
    checkpoint = read_uri(weights, storage_options) if weights else None
    return build_vit(name, pretrained=pretrained, checkpoint=checkpoint, source=weights or "", seed=seed, device=device)


def load_store_model(
    name: str,
    identity: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> ViT:
    """Load the model a store records (`name`, weights `identity`): random-init stores reuse their
    seed; otherwise the caller names the weights, and they must be the recorded ones."""
    vit = load_vit(name, pretrained=pretrained, weights=weights, seed=seed_of(identity), storage_options=storage_options, device=device)
    check_same_model(vit, name, identity)
    return vit


def weights_id(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """The provenance string `load_vit` records, computed without building the model: a weights
    file is hashed as it streams (no copy of it held in memory)."""
    if not weights:
        return hub_or_seed_id(name, pretrained=pretrained, seed=seed)
    digest = hashlib.sha256()
    with fsspec.open(weights, "rb", **(storage_options or {})) as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return checkpoint_id(digest)
