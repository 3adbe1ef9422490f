"""A shard's JPEGs decoded together on the model's device (`--decoder device`).

Beside a GPU the host's share of an image is then reading its bytes and parsing its header
(`images.encoded`): the JPEG library (`jpeg_library`) decodes the batch with nvJPEG, each image
turned upright by its EXIF tag, and the crop and resize run there too with Pillow's integer
arithmetic (`resample`), so the model sees the inputs Pillow would give it.
Images of one size share one resize. A batch nvJPEG refuses is decoded image by image, and an
image the device cannot decode comes back as None, for Pillow to decode or name what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.extraction import jpeg_library
from pipeline.extraction.images import (
    Encoded,
    ImageError,
    ImagePolicy,
    Prepared,
    as_input,
    input_geometry,
    upright,
)
from pipeline.extraction.resample import resize

BATCH_PIXELS = 1 << 28  # decoded pixels held on the device at once (768 MiB of RGB)


def decode_encoded(
    inputs: list[Prepared | Encoded | ImageError], policy: ImagePolicy, device: torch.device, on_host: Callable[[int], Prepared | ImageError]
) -> list[Prepared | ImageError]:
    """`inputs` with each `Encoded` replaced by its model input decoded on `device`, or where the
    device could not decode it by `on_host(its index)`: the host's decoders, which name what is
    wrong with it."""
    at = [i for i, item in enumerate(inputs) if isinstance(item, Encoded)]
    inputs = list(inputs)
    for i, item in zip(at, decode_batches([inputs[i] for i in at], policy, device)):
        inputs[i] = item if item is not None else on_host(i)
    return inputs


def decode_batches(items: list[Encoded], policy: ImagePolicy, device: torch.device) -> list[Prepared | None]:
    """Each JPEG as a model input on `device`, or None where the device could not decode it."""
    decoded: list[torch.Tensor | None] = []
    for batch in _batches(items):
        decoded += [None if pixels is None else upright(pixels, item.height, item.width) for item, pixels in zip(batch, _decoded(batch, device))]
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, pixels in enumerate(decoded):
        if pixels is not None:
            by_size.setdefault(tuple(pixels.shape[1:]), []).append(index)
    inputs: list[Prepared | None] = [None] * len(items)
    for (height, width), members in by_size.items():
        size, region = input_geometry(height, width, policy)
        stacked = torch.stack([decoded[i] for i in members])
        resized = stacked if policy.resize == "pad" else resize(stacked, size, region)
        for i, pixels in zip(members, resized):
            inputs[i] = as_input(pixels, policy, (height, width), region)
    return inputs


def _batches(items: list[Encoded]) -> list[list[Encoded]]:
    """Consecutive items in batches of at most BATCH_PIXELS decoded pixels (one item at least)."""
    batches: list[list[Encoded]] = []
    pixels = BATCH_PIXELS
    for item in items:
        if pixels + item.height * item.width > BATCH_PIXELS:
            batches.append([])
            pixels = 0
        batches[-1].append(item)
        pixels += item.height * item.width
    return batches


def _decoded(batch: list[Encoded], device: torch.device) -> list[torch.Tensor | None]:
    """The batch decoded as stored ([3, H, W] uint8 on `device`); None where an image fails alone."""
    try:
        return jpeg_library.LIBRARY.decode([item.data for item in batch], device)
    except RuntimeError:
        if len(batch) == 1:
            return [None]
        return [pixels for item in batch for pixels in _decoded([item], device)]
