"""The paper's settings as presets: one name sets every flag of the authors' pipeline for a task.

A preset is applied before validation; a flag given with another value than the preset's is
refused, naming both, so neither silently wins (README: Presets).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pipeline.engine.models import ModelFacts
from pipeline.engine.shifts import grid_shifts
from pipeline.extraction.flags import ConfigError, field_default, show_value

if TYPE_CHECKING:
    from pipeline.extraction.config import ExtractConfig


TOKEN_STRIDE = "patch"  # a preset's stride: the model's patch size
DEPTH_HEAD_BLOCKS = "depth-head-blocks"  # a preset's layers: the four blocks DINOv2's linear4 / DPT depth heads read
DINOV2_DEPTH_HEAD_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}  # by model depth (dinov2/hub/depthers.py)

# The paper's settings, one flag each (README: Presets). Values are flag values; every field named
# is set, and a flag given with another value is refused rather than silently overridden.
PRESETS: dict[str, dict[str, Any]] = {
    # The authors' DAVIS path (EnsembledExtractor on DINO's eval_video_segmentation.py): the frame
    # plus the 3x3 pixel grid (the zero shift twice, 10 views), zero fill and a plain mean, the last
    # block after the final norm pooled to token stride; frames with the shorter side 480 and the
    # longer one floored to a multiple of 64, resized as cv2.resize does, normalized as DINO's
    # video evaluation does (std 0.228 for red); position embeddings resized as DINO's code does.
    "srt-paper-davis": {
        "shifts": ((0, 0), *grid_shifts(1)),
        "radius": None,
        "random_shifts": None,
        "boundary": "zeros",
        "stride": TOKEN_STRIDE,
        "layers": (-1,),
        "norm": True,
        "image_size": 480,
        "resize": "aspect-floor64",
        "resample": "cv2-bilinear",
        "pos_embed_resize": "reference",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.228, 0.224, 0.225),
    },
    # The authors' depth path (DinoV2DepthFeatsEnsembledExtractor on DINOv2's NYU depth models):
    # the frame plus the 7x7 pixel grid (the zero shift twice, 50 views), zero fill and a plain mean;
    # the four blocks the linear4 / DPT heads read, without the final norm, with their class
    # tokens; images at their own size, each shifted view centre-padded with zeros to a multiple
    # of the patch (DINOv2's CenterPadding), averaged on that padded canvas at token stride;
    # position embeddings resized as DINOv2's code does.
    "srt-paper-depth": {
        "shifts": ((0, 0), *grid_shifts(3)),
        "radius": None,
        "random_shifts": None,
        "boundary": "zeros",
        "stride": TOKEN_STRIDE,
        "layers": DEPTH_HEAD_BLOCKS,
        "norm": False,
        "resize": "pad",
        "pos_embed_resize": "reference",
    },
}


def preset_value(value: Any, facts: ModelFacts) -> Any:
    """A preset's setting for this model: the token stride and the depth heads' blocks depend on it."""
    if value == TOKEN_STRIDE:
        return facts.patch_size
    if value == DEPTH_HEAD_BLOCKS:
        return DINOV2_DEPTH_HEAD_BLOCKS.get(facts.depth, tuple(round(facts.depth * k / 4) - 1 for k in range(1, 5)))
    return value


def apply_preset(config: ExtractConfig, facts: ModelFacts) -> ExtractConfig:
    """The config with its preset's settings; a flag given with a value other than the preset's
    is refused, naming both, so neither silently wins."""
    if config.preset is None:
        return config
    if config.preset not in PRESETS:
        raise ConfigError(config.flags["preset"], f"must be one of {tuple(PRESETS)}, got {config.preset!r}")
    settings = {name: preset_value(value, facts) for name, value in PRESETS[config.preset].items()}
    defaults = {f.name: field_default(f) for f in dataclasses.fields(config)}
    for name, value in settings.items():
        given = getattr(config, name)
        if given != defaults[name] and given != value:
            wanted = "unset" if value is None else show_value(value)
            raise ConfigError(config.flags[name], f"--preset {config.preset} sets it to {wanted}; drop one of the two")
    return dataclasses.replace(config, **settings)
