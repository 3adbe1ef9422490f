"""Position embeddings at other grid sizes, resized as each model family's own code resizes them.

A ViT's position-embedding table is learnt for one token grid (14 x 14 for a /16 model at 224²);
an input of another size needs the table resized. timm (`dynamic_img_size`) resizes to the new
grid with an antialiased bicubic (`resample_abs_pos_embed`). The families' reference code does
otherwise, and features computed one way differ from the other by several per cent:

- DINO (`vision_transformer.py`, `interpolate_pos_encoding`): bicubic by a scale factor of
  (grid + 0.1) / M per axis, M the learnt side, without antialiasing;
- DINOv2 (`dinov2/models/vision_transformer.py`, same name): the same with its
  `interpolate_offset` 0.1 and `interpolate_antialias` False for the plain backbones
  (`dinov2/hub/backbones.py`); the backbones with registers use offset 0 (an output size, not a
  scale factor) with antialiasing, which is timm's rule.

Both leave a table of the learnt square grid as it is, and resize in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

RESIZES = ("reference", "timm")


@dataclass(frozen=True)
class ResizeRule:
    """How a family's code resizes its table: bicubic by (grid + offset) / M, or to the grid when
    the offset is 0; antialiased or not."""

    offset: float
    antialias: bool


DINO_RULE = ResizeRule(offset=0.1, antialias=False)


def reference_rule(name: str) -> ResizeRule | None:
    """The rule of the reference code of timm model `name`'s family where it differs from timm's
    own (DINO, DINOv2 without registers), else None: timm's rule is the family's, or the family
    has no code of its own (the original ViT, DeiT, ...)."""
    architecture, _, tag = name.partition(".")
    if "dinov2" in architecture:
        return None if "_reg" in architecture else DINO_RULE
    return DINO_RULE if tag.startswith("dino") else None


def resize_table(table: torch.Tensor, num_prefix: int, learnt: tuple[int, int], grid: tuple[int, int], rule: ResizeRule) -> torch.Tensor:
    """The position table [1, P + M*M, C] (P prefix entries first) for a token grid (h, w), by `rule`."""
    if tuple(grid) == tuple(learnt):
        return table
    side = learnt[0]
    if learnt[0] != learnt[1]:
        raise ValueError(f"the reference resize needs a square learnt grid, got {learnt}")
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    square = patches.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if rule.offset:
        scale = ((grid[0] + rule.offset) / side, (grid[1] + rule.offset) / side)
        resized = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=rule.antialias)
    else:
        resized = F.interpolate(square, size=tuple(grid), mode="bicubic", antialias=rule.antialias)
    if tuple(resized.shape[-2:]) != tuple(grid):
        raise ValueError(f"resizing {learnt} to {grid} by {rule} gave {tuple(resized.shape[-2:])}")
    patches = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(table.dtype)
    return torch.cat([prefix, patches], dim=1)


def _add_positions(model: VisionTransformer, rule: ResizeRule, x: torch.Tensor) -> torch.Tensor:
    """timm's `VisionTransformer._pos_embed` for inputs of any size, the table resized by `rule`."""
    batch, height, width, channels = x.shape
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    table = resize_table(model.pos_embed, num_prefix, tuple(model.patch_embed.grid_size), (height, width), rule)
    prefix = [token.expand(batch, -1, -1) for token in (model.cls_token, model.reg_token) if token is not None]
    x = x.reshape(batch, height * width, channels)
    if model.no_embed_class:
        x = torch.cat([*prefix, x + table], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + table
    return model.pos_drop(x)


def use_resize(model: VisionTransformer, name: str, resize: str) -> None:
    """Make `model` resize its position table by `resize`: "reference" (its family's rule, where
    that is not timm's) or "timm" (timm's own `_pos_embed`)."""
    if resize not in RESIZES:
        raise ValueError(f"position-embedding resize must be one of {RESIZES}, got {resize!r}")
    rule = reference_rule(name) if resize == "reference" else None
    if rule is None:
        model.__dict__.pop("_pos_embed", None)  # the class's own method again
    else:
        model._pos_embed = functools.partial(_add_positions, model, rule)
