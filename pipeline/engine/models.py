"""Load a timm Vision Transformer and tap token grids out of it.

This is the only module that knows timm's internals. Everything downstream sees a
`ViT`: patch size, widths, normalization, and `forward_taps`, which returns each
requested tap as a token grid [B, C, h, w] with its prefix tokens kept apart.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pipeline.engine.positions import use_resize

TapKind = Literal["block", "keys"]

# Keys under which training frameworks nest the backbone weights, in order of preference
# (DINO saves both teacher and student; the teacher is the one people evaluate).
WRAPPER_KEYS = ("teacher", "model", "state_dict", "module", "student")
# Prefixes that DDP and DINO-style wrappers put in front of backbone parameter names.
WRAPPER_PREFIXES = ("module.", "backbone.")


@dataclass(frozen=True, order=True)
class Tap:
    """One thing to read out of the network: a block's output or a block's attention keys."""

    kind: TapKind
    layer: int  # non-negative block index

    @property
    def name(self) -> str:
        """Short stable name used in store paths: L11 for block 11, K11 for its keys."""
        return f"{'L' if self.kind == 'block' else 'K'}{self.layer}"


class TokenMap(NamedTuple):
    """A tap's patch tokens as a grid, and its prefix (CLS, register) tokens apart."""

    grid: torch.Tensor  # [B, C, h, w]
    prefix: torch.Tensor  # [B, P, C], P = 0 for models without prefix tokens


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline needs to know about a model before (or without) loading weights."""

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_prefix_tokens: int  # CLS + registers
    num_registers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, name: str, model: VisionTransformer) -> ModelFacts:
        cfg = model.pretrained_cfg
        return cls(
            name=name,
            patch_size=int(model.patch_embed.patch_size[0]),
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            num_registers=int(getattr(model, "num_reg_tokens", 0)),
            mean=tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
            std=tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        )


def describe_model(name: str) -> ModelFacts:
    """Facts of timm model `name` without allocating or loading weights (built on the meta device)."""
    with torch.device("meta"):
        return ModelFacts.of(name, _create(name, pretrained=False, seed=0))


@dataclass
class ViT:
    """A frozen timm ViT with the facts the SRT engine needs about it."""

    model: VisionTransformer
    name: str
    weights_id: str  # provenance: where the weights came from, content hash where there is one

    def __post_init__(self) -> None:
        self.facts = ModelFacts.of(self.name, self.model)

    @property
    def patch_size(self) -> int:
        return self.facts.patch_size

    @property
    def embed_dim(self) -> int:
        return self.facts.embed_dim

    @property
    def depth(self) -> int:
        return self.facts.depth

    @property
    def num_prefix_tokens(self) -> int:
        return self.facts.num_prefix_tokens

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.facts.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.facts.std

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> ViT:
        self.model.to(device)
        return self

    def use_pos_embed_resize(self, resize: str) -> None:
        """Resize the position table for other input sizes by "reference" (the model family's own
        code) or "timm" (`pipeline.engine.positions`)."""
        use_resize(self.model, self.name, resize)

    def resolve_layer(self, layer: int) -> int:
        """Map a block index (negative counts from the end) to 0..depth-1, or explain the range."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not -self.depth <= layer < self.depth:
            raise ValueError(
                f"layer {layer} is out of range for {self.name}, which has {self.depth} blocks: "
                f"use 0..{self.depth - 1} or -{self.depth}..-1"
            )
        return layer % self.depth

    def check_input(self, images: torch.Tensor) -> None:
        """Reject inputs the model cannot take, saying what to change."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a normalized float tensor, got {images.dtype}: "
                f"convert to float and normalize with mean={self.mean}, std={self.std}"
            )
        height, width = images.shape[-2:]
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} must be a positive multiple of {self.name}'s patch size {p} "
                f"on both sides (resize or pad to e.g. {max(p, height // p * p)}x{max(p, width // p * p)})"
            )

    def taps(self, layers: Iterable[int], keys: Iterable[int] = ()) -> tuple[Tap, ...]:
        """The sorted, de-duplicated taps for block outputs at `layers` and attention keys at `keys`."""
        found = {Tap("block", self.resolve_layer(i)) for i in layers}
        found |= {Tap("keys", self.resolve_layer(i)) for i in keys}
        if not found:
            raise ValueError("at least one layer (or keys layer) must be requested")
        return tuple(sorted(found))

    def forward_taps(self, images: torch.Tensor, taps: Sequence[Tap], *, norm: bool) -> dict[Tap, TokenMap]:
        """Run the blocks up to the deepest tap only, and return every tap as a TokenMap.
        Gradients flow unless the caller turns them off (SRT does; distillation trains through it).

        `norm` applies the model's final norm to block outputs (the reference SRT code does);
        keys are read as the attention computes them (after any key norm), never re-normalized.
        """
        self.check_input(images)
        blocks = sorted({t.layer for t in taps})
        captured_keys: dict[int, torch.Tensor] = {}
        hooks = [
            self.model.blocks[t.layer].attn.k_norm.register_forward_hook(_capture_keys(captured_keys, t.layer))
            for t in taps
            if t.kind == "keys"
        ]
        try:
            outputs = self.model.forward_intermediates(
                images,
                indices=blocks,
                return_prefix_tokens=True,
                norm=norm,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )
        finally:
            for hook in hooks:
                hook.remove()
        by_layer = dict(zip(blocks, outputs))
        result = {}
        for tap in taps:
            if tap.kind == "keys":
                result[tap] = self._split_tokens(captured_keys[tap.layer], images.shape[-2:])
            elif self.num_prefix_tokens:  # timm returns (grid, prefix) pairs only when there are prefixes
                result[tap] = TokenMap(*by_layer[tap.layer])
            else:
                grid = by_layer[tap.layer]
                result[tap] = TokenMap(grid, grid.new_zeros(grid.shape[0], 0, grid.shape[1]))
        return result

    def _split_tokens(self, tokens: torch.Tensor, image_hw: Sequence[int]) -> TokenMap:
        """[B, P + h*w, C] tokens -> TokenMap(grid [B, C, h, w], prefix [B, P, C])."""
        batch, _, channels = tokens.shape
        grid_hw = (image_hw[0] // self.patch_size, image_hw[1] // self.patch_size)
        prefix = tokens[:, : self.num_prefix_tokens]
        grid = tokens[:, self.num_prefix_tokens :].reshape(batch, *grid_hw, channels).permute(0, 3, 1, 2)
        return TokenMap(grid=grid, prefix=prefix)


def _capture_keys(store: dict[int, torch.Tensor], layer: int):
    """Forward hook on `attn.k_norm`: its output is keys as [B, heads, N, head_dim]; keep [B, N, C]."""

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        batch, heads, tokens, head_dim = output.shape
        store[layer] = output.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    return hook


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_vit(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: bytes | None = None,
    source: str = "checkpoint",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ViT:
    """Build timm model `name` for arbitrary input sizes, with weights from one of three places.

    - `pretrained=True`: timm's pretrained weights (needs access to the model hub).
    - `checkpoint`: the bytes of a safetensors or torch checkpoint (`source` names it in errors);
      DINO-style wrappers (teacher/student/model/state_dict) and `module.`/`backbone.` prefixes
      are unwrapped.
    - neither: random init seeded by `seed`, reproducible across machines (tests, offline demos).
    """
    if pretrained and checkpoint is not None:
        raise ValueError("give either pretrained=True or a checkpoint, not both")
    model = _create(name, pretrained=pretrained, seed=seed)
    if checkpoint is not None:
        _load_state_dict(model, name, _parse_checkpoint(checkpoint, source))
        identity = checkpoint_id(hashlib.sha256(checkpoint))
    else:
        identity = hub_or_seed_id(name, pretrained=pretrained, seed=seed)
    model.eval().requires_grad_(False)
    return ViT(model=model, name=name, weights_id=identity).to(device or default_device())


def checkpoint_id(digest: Any) -> str:
    """The provenance string of a checkpoint: the SHA-256 of its bytes, so a changed file at the
    same URI is noticed."""
    return f"sha256:{digest.hexdigest()}"


def hub_or_seed_id(name: str, *, pretrained: bool, seed: int) -> str:
    """The provenance string of weights without a file: timm's hub tag, or the random init's seed."""
    if pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        return f"timm:{cfg.architecture}.{cfg.tag}" if cfg else f"timm:{name}"
    return f"random:seed={seed}"


def fetch_pretrained(name: str) -> None:
    """Download timm's pretrained weights of `name` into the local cache now, on the driver: the
    actors on this node then load them from there, and a cluster that cannot reach the hub fails
    at planning in one line instead of in every actor after minutes of retries."""
    try:
        _create(name, pretrained=True, seed=0)
    except Exception as error:  # hub, network and cache errors come in many types
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        raise OSError(f"weights for {name} could not be downloaded ({reason}); pass --weights URI of a local or fsspec checkpoint") from error


def check_same_model(vit: ViT, name: str, identity: str) -> None:
    """Refuse a model other than the one a store was made with (queries must match the database)."""
    if vit.name != name or vit.weights_id != identity:
        raise ValueError(
            f"the query model must be the store's: store has {name} with {identity}, got {vit.name} with {vit.weights_id} "
            "(pass the same --pretrained or --weights)"
        )


def seed_of(identity: str) -> int:
    """The seed of a random-init weights identity ("random:seed=3" -> 3); 0 for real weights."""
    return int(identity.split("=", 1)[1]) if identity.startswith("random:seed=") else 0


def nearest_models(name: str, count: int = 3) -> list[str]:
    """timm's model names closest to a misspelt one (its pretrained tags too: `vit_small_patch16_224.dino`)."""
    names = timm.list_pretrained() if "." in name else timm.list_models()
    return difflib.get_close_matches(name, names, n=count, cutoff=0.8)


def _create(name: str, *, pretrained: bool, seed: int) -> VisionTransformer:
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    except RuntimeError as error:
        if "Unknown model" in str(error) or "Invalid pretrained tag" in str(error):
            close = nearest_models(name)
            hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('vit_*')"
            raise ValueError(f"unknown timm model {name!r}: {hint}") from error
        raise
    except TypeError as error:  # a non-ViT family rejects dynamic_img_size
        raise ValueError(f"{name!r} is not a Vision Transformer the SRT engine can tap ({error})") from error
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer: "
            "the SRT engine taps plain ViTs (vit_*, deit_*, DINO/DINOv2 ViTs)"
        )
    patch = model.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ValueError(f"{name!r} has non-square patches {patch}: the SRT engine needs square patches")
    return model


def _parse_checkpoint(raw: bytes, uri: str) -> dict[str, torch.Tensor]:
    """Bytes of a safetensors or torch checkpoint -> a flat backbone state dict."""
    if raw[:2] != b"PK":  # torch.save writes a zip archive; safetensors starts with its header size
        from safetensors.torch import load as load_safetensors

        return _strip_prefixes(load_safetensors(raw))
    # weights_only keeps unpickling safe; DINO checkpoints also hold their argparse.Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return _strip_prefixes(_unwrap(checkpoint, uri))


def _unwrap(checkpoint: Any, uri: str) -> dict[str, torch.Tensor]:
    while isinstance(checkpoint, dict) and not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        key = next((k for k in WRAPPER_KEYS if k in checkpoint), None)
        if key is None:
            raise ValueError(f"{uri}: no weights found; top-level keys are {sorted(checkpoint)[:12]}")
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{uri}: expected a state dict of tensors, found {type(checkpoint).__name__}")
    return checkpoint


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _load_state_dict(model: VisionTransformer, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load into the backbone: missing backbone weights are an error, extra heads are dropped."""
    state = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"checkpoint does not fit {name!r}: missing {len(missing)} weights, e.g. {missing[:5]}")
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} checkpoint weights {name!r} has no place for, e.g. {unexpected[:5]}")
