"""Model weights named by URI: read a checkpoint through fsspec into the engine's ViT, and the
provenance string of a weights choice without building the model.

The engine builds models from bytes and never touches a filesystem; this module is where a
checkpoint URI (local, s3://, gs://, http(s)://) becomes those bytes.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import fsspec
import huggingface_hub
import timm
import torch

from pipeline.engine.models import (
    ViT,
    build_vit,
    check_same_model,
    checkpoint_id,
    fetch_pretrained,
    hub_or_seed_id,
    seed_of,
)
from pipeline.store.uris import one_line, read_uri

HUB_PROBE_SECONDS = 3.0  # one request, no retries: whether the weights' server answers at all
HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from the hub, in order


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


def fetch_pretrained_weights(name: str) -> None:
    """timm's pretrained weights of `name` into the local cache, on the driver before any cluster
    starts. Weights neither cached nor reachable fail at once in one line: the hub client would
    otherwise retry for about a minute, logging each retry, before saying the same."""
    if (server := _uncached_source(name)) is not None:
        try:
            urllib.request.urlopen(urllib.request.Request(server, method="HEAD"), timeout=HUB_PROBE_SECONDS).close()
        except urllib.error.HTTPError:
            pass  # the server answered: timm's own download says what is wrong, if anything
        except (OSError, ValueError) as error:
            raise OSError(f"weights for {name} are not in the local cache and {server} cannot be reached ({one_line(error, 120)}); pass --weights URI of a local or fsspec checkpoint") from error
    fetch_pretrained(name)


def _uncached_source(name: str) -> str | None:
    """The server timm would download `name`'s weights from, or None when they are cached here
    (or timm names no source: its own error then says so)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHTS_FILES
        if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, file, revision=revision or None), str) for file in files):
            return None
        return huggingface_hub.constants.ENDPOINT
    if cfg.url:
        parts = urllib.parse.urlsplit(cfg.url)
        if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(parts.path))):
            return None
        return f"{parts.scheme}://{parts.netloc}"
    return None

