"""The library that decodes JPEGs into tensors, on the CPU (libjpeg-turbo) or a GPU (nvJPEG).

TorchCodec's image decoders where they load: they link the torch release TorchCodec was built
for, and turn each image upright by its EXIF tag on every device. Where they do not (an older torch
pinned on a cluster, whose TorchCodec has no image decoders, or a CPU-only torch wheel),
torchvision.io's `decode_jpeg`: deprecated from torchvision 0.29 on, present in every release
those stacks carry, and it reads no EXIF tag on a GPU, so with it a JPEG not stored upright goes to
Pillow. With neither, Pillow decodes everything (`images.resolve_decoder` says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Decode = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


@dataclass(frozen=True)
class JpegLibrary:
    name: str
    decode: Decode  # files' bytes (1-D uint8 CPU tensors) -> [3, H, W] uint8 RGB on the device
    orients: bool  # whether it turns each image upright by its EXIF orientation tag


def torchcodec() -> JpegLibrary:
    from torchcodec.decoders import decode_jpeg

    return JpegLibrary("torchcodec", lambda data, device: decode_jpeg(data, mode="RGB", device=device), orients=True)


def torchvision() -> JpegLibrary:
    from torchvision.io import ImageReadMode, decode_jpeg

    return JpegLibrary("torchvision", lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device), orients=False)


def _load() -> tuple[JpegLibrary | None, str]:
    """The first library that loads, or None and why none does."""
    errors = []
    for library in (torchcodec, torchvision):
        try:
            return library(), ""
        except (ImportError, OSError, RuntimeError) as error:
            errors.append(f"{library.__name__}: {type(error).__name__}: {error}")
    return None, "; ".join(errors)


LIBRARY, LIBRARY_ERROR = _load()
