"""Decode, orient, convert, resize and normalize images, recording where the model input came from.

Three decoders give the same model inputs:
- pillow: every format and mode;
- torch: 8-bit RGB and greyscale JPEGs, the bulk of datasets, decoded by TorchCodec (or
  torchvision.io where it does not load: `jpeg_library`), libjpeg-turbo, bit-identical to Pillow's
  decode, and resized by torch's antialiased bicubic (Pillow's filter: within 0.1/255 on average;
  bench/RESULTS.md), ops that release the interpreter lock;
- device: the same JPEGs decoded in batches on the model's device (nvJPEG on a GPU) and resized
  there with Pillow's own integer arithmetic (`resample`), so a GPU actor's host only reads bytes
  and parses headers: on a CPU bit for bit Pillow's inputs, on a GPU up to nvJPEG's decode against
  libjpeg-turbo's (bench_gpu measures it). A shard worker batches them (`encoded`,
  `device_decoding`); one image alone goes through `torch`.
Everything else goes to Pillow, and so does a torch resize whose box starts between pixels
(torch's kernel cannot place it). `auto` is `device` beside a GPU, `torch` elsewhere.

Decoding failures raise `ImageError` with a short `kind`, which becomes the manifest's
`error_kind`; the pipeline turns them into error rows and goes on.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.extraction import jpeg_library

log = logging.getLogger("srt")

RESAMPLE = Image.Resampling.BICUBIC
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, as browsers show them
DECODERS = ("pillow", "torch", "device")
LEGACY_DECODERS = {"torchvision": "torch"}  # the name in stores written while torchvision.io decoded JPEGs
TENSOR_MODES = ("RGB", "L")  # JPEG modes libjpeg-turbo and nvJPEG decode to RGB as Pillow does (not CMYK)
QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations whose upright image swaps the sides
JPEG_END = b"\xff\xd9"
DEFAULT_MAX_TOKENS = 16_384  # patches per model input: 2048 x 2048 pixels at patch 16 (a 224-pixel square has 196)


class ImageError(Exception):
    """An item that cannot become a model input; `kind` is a stable, groupable category."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImagePolicy:
    """How every image becomes a model input of the run."""

    size: int  # square side, or the shorter side ("aspect", "aspect-floor64"); unused by "pad"
    resize: str  # "square", "aspect", "aspect-floor64" or "pad" (original size, centre-padded to the patch)
    patch: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = 89_478_485
    resample: str = "bicubic"  # Pillow's antialiased bicubic, or "cv2-bilinear" (whole-image policies)
    reducing_gap: float = 0.0  # > 0: JPEGs decoded smaller while at least this many times the input size
    decoder: str = "pillow"  # "torch" or "device" (module docstring; `resolve_decoder` turns "auto" into one)
    max_tokens: int = DEFAULT_MAX_TOKENS  # model inputs with more patches are refused (`input_geometry`)

    @property
    def decoded_shorter_side(self) -> int:
        """The shorter side a JPEG must keep when decoded by DCT scaling (0: decode in full). Only
        Pillow's resampling of the resized policies takes it; each scales the shorter side to `size`
        and the longer side by about as much (up to half a patch of rounding)."""
        if not self.reducing_gap or self.resize == "pad" or self.resample != "bicubic":
            return 0
        return math.ceil(self.size * self.reducing_gap)


@dataclass
class Prepared:
    """A model input [3, H, W] and the facts needed to map its features back to the original.

    The pixels stay 8-bit until `normalize` (a quarter of the bytes to copy to a GPU, and the
    float arithmetic runs batched on the model's device instead of per image in a decode thread)."""

    pixels: torch.Tensor  # [3, H, W] uint8, resized (and padded) as the model sees it
    height: int  # original size after EXIF orientation
    width: int
    region: tuple[float, float, float, float]  # (y0, x0, y1, x1) of the original shown to the model
    bucket: str | None  # "HxW" under the aspect policy, None when every input has one size
    input_size: tuple[int, int]  # (H, W) of the model input; kept when the pixels are dropped
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    valid: torch.Tensor | None = None  # [1, H, W]: the real pixels of a padded input ("pad"), else None

    @property
    def tensor(self) -> torch.Tensor:
        """The normalized model input [3, H, W] fp32."""
        return normalize(self.pixels[None], self.mean, self.std, None if self.valid is None else self.valid[None])[0]


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], valid: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] -> (pixels / 255 - mean) / std in fp32, as torchvision's ToTensor and
    Normalize compute it, and 0 (the mean colour) outside `valid` [B, 1, H, W] (padding). Runs on
    the pixels' device."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    normalized = (pixels.float() / 255.0 - mean_t) / std_t
    return normalized if valid is None else normalized * valid


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB image; too large, unreadable or truncated input raises ImageError."""
    return decode_scaled(data, max_pixels)[0]


def decode_scaled(data: bytes, max_pixels: int, shorter_side: int = 0) -> tuple[Image.Image, tuple[int, int], int]:
    """`decode`, and with `shorter_side` a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's
    DCT scaling, about 2x faster on 3-12 MP photos) where its shorter side stays at least that.
    Returns (the upright image, the original's upright (height, width), the scale divided by)."""
    if not data:
        raise ImageError("empty", "zero-byte file")
    if max_pixels > (Image.MAX_IMAGE_PIXELS or max_pixels):
        # Pillow's own bomb check refuses images over twice its limit inside Image.open, before ours
        # runs: raise it as far as --max-pixels asks, since the check below governs.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    "too_large",
                    f"{width}x{height} = {width * height} pixels exceeds --max-pixels {max_pixels} (decompression-bomb limit)",
                )
            scale = _draft(image, shorter_side) if shorter_side and image.format == "JPEG" else 1
            image.load()
    except Image.DecompressionBombError as error:
        raise ImageError("too_large", f"{error} (decompression-bomb limit)") from error
    except UnidentifiedImageError as error:
        raise ImageError("decode", "not an image Pillow can read") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError("decode", f"corrupt image: {error}") from error
    if image.getexif().get(ExifTags.Base.Orientation) in QUARTER_TURNS:
        width, height = height, width
    ImageOps.exif_transpose(image, in_place=True)  # in place: otherwise a copy of every upright image
    return to_rgb(image), (height, width), scale


def _draft(image: Image.Image, shorter_side: int) -> int:
    """Ask the JPEG decoder for the smallest DCT scale keeping `shorter_side`; the scale it chose."""
    width, height = image.size
    wanted = (math.ceil(width * shorter_side / min(width, height)), math.ceil(height * shorter_side / min(width, height)))
    drafted = image.draft(None, wanted)
    return round(width / drafted[1][2]) if drafted else 1  # its box is the original's extent, scaled


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit scaled down, transparency composited onto white."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((values.clip(0, 65535) >> 8).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def input_geometry(height: int, width: int, policy: ImagePolicy) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Model input size and the original region (y0, x0, y1, x1) it is resampled from. Raises
    ImageError (too_large) when the input would hold more than the policy's `max_tokens` patches:
    a pixel bound alone does not bound it (`--resize aspect` makes a 1 x 60,000 image 224 x 13.4M)."""
    (out_h, out_w), region = _geometry(height, width, policy)
    tokens = -(-out_h // policy.patch) * -(-out_w // policy.patch)
    if tokens > policy.max_tokens:
        raise ImageError(
            "too_large",
            f"{width}x{height} would be a {out_w}x{out_h} model input of {tokens} patches (--resize {policy.resize}), over --max-tokens {policy.max_tokens}",
        )
    return (out_h, out_w), region


def _geometry(height: int, width: int, policy: ImagePolicy) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    size, patch = policy.size, policy.patch
    if policy.resize == "pad":  # DINOv2's CenterPadding: the extra row or column goes bottom / right
        out_h, out_w = -(-height // patch) * patch, -(-width // patch) * patch
        top, left = (out_h - height) // 2, (out_w - width) // 2
        return (out_h, out_w), (float(-top), float(-left), float(out_h - top), float(out_w - left))
    if policy.resize == "square":
        side = min(height, width)
        top, left = (height - side) / 2, (width - side) / 2
        return (size, size), (top, left, top + side, left + side)
    short, long = min(height, width), max(height, width)
    if policy.resize == "aspect-floor64":  # DINO's video evaluation: long side floored to a multiple of 64
        long_out = max(64, int(size * long / short // 64 * 64))
    else:
        long_out = max(patch, round(long * size / short / patch) * patch)
    out = (size, long_out) if height <= width else (long_out, size)
    return out, (0.0, 0.0, float(height), float(width))


def prepare(data: bytes, policy: ImagePolicy) -> Prepared:
    """Bytes -> normalized model input with its geometry, by the policy's decoder."""
    if policy.decoder in ("torch", "device") and (pixels := decode_tensor(data, policy)) is not None:
        return prepare_tensor(pixels, policy)
    image, size, scale = decode_scaled(data, policy.max_pixels, policy.decoded_shorter_side)
    return prepare_image(image, policy, original=size, scale=scale)


def prepare_or_defer(data: bytes, policy: ImagePolicy) -> Prepared | Encoded:
    """`prepare`, except that a JPEG the device decoder takes is left `Encoded` for its batch
    (`device_decoding`)."""
    if policy.decoder == "device" and (jpeg := encoded(data, policy)) is not None:
        return jpeg
    return prepare(data, policy)


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """The decoder a worker on `device` uses for the flag's value: `auto` is `device` beside a GPU
    (the host only reads bytes) and `torch` elsewhere (never slower than Pillow; bench/RESULTS.md)."""
    decoder = LEGACY_DECODERS.get(decoder, decoder)
    if decoder == "auto":
        decoder = "device" if device.type == "cuda" else "torch"
    if decoder != "pillow" and jpeg_library.LIBRARY is None:
        log.warning("--decoder %s: no JPEG library loads here (%s); Pillow decodes every image, to the same inputs", decoder, jpeg_library.LIBRARY_ERROR)
        return "pillow"
    return decoder


@dataclass(frozen=True)
class Encoded:
    """A JPEG left for its shard's batch decode on the model's device, with its upright size."""

    data: torch.Tensor  # the file's bytes, 1-D uint8 on the CPU
    height: int  # after EXIF orientation, as Pillow reads the tag
    width: int


def jpeg_header(data: bytes, policy: ImagePolicy) -> tuple[int, int] | None:
    """(upright height, width) of a whole 8-bit RGB or greyscale JPEG within the bomb limit, or None
    where Pillow must decode: another format or mode, no end marker (truncated), too large (Pillow
    names it), a JPEG to decode smaller (`--reducing-gap`), no JPEG library here, or one not stored
    upright where the library does not turn it (`jpeg_library`). Reads the header only."""
    library = jpeg_library.LIBRARY
    if library is None or policy.decoded_shorter_side or not data.rstrip(b"\0").endswith(JPEG_END):
        return None
    try:
        header = Image.open(io.BytesIO(data))
        orientation = header.getexif().get(ExifTags.Base.Orientation)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if header.format != "JPEG" or header.mode not in TENSOR_MODES or header.width * header.height > policy.max_pixels:
        return None
    if orientation not in (None, 1) and not library.orients:
        return None
    width, height = header.size
    upright_size = (width, height) if orientation in QUARTER_TURNS else (height, width)
    input_geometry(*upright_size, policy)  # an input over --max-tokens is refused before any decode
    return upright_size


def encoded(data: bytes, policy: ImagePolicy) -> Encoded | None:
    """The JPEG as an `Encoded` for the device decoder, or None where another decoder must decode it
    (`jpeg_header`, or a resampling other than Pillow's bicubic)."""
    header = jpeg_header(data, policy) if policy.resample == "bicubic" else None
    return None if header is None else Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), *header)


def upright(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """The JPEG library's decode ([3, H, W], turned upright by its own reading of the EXIF tag), or None
    where its size is not the upright size Pillow reads from the same header."""
    return pixels if tuple(pixels.shape) == (3, height, width) else None


def decode_tensor(data: bytes, policy: ImagePolicy) -> torch.Tensor | None:
    """An upright [3, H, W] uint8 tensor decoded by the JPEG library, or None where Pillow must decode
    (`jpeg_header`); a file the library still cannot decode goes to Pillow too, which names what
    is wrong with it."""
    header = jpeg_header(data, policy)
    if header is None:
        return None
    try:
        return upright(jpeg_library.LIBRARY.decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))[0], *header)
    except RuntimeError:
        return None


def prepare_array(pixels: np.ndarray, policy: ImagePolicy) -> Prepared:
    """Pixels decoded elsewhere ([H, W] or [H, W, C] arrays, as Ray Data's `read_images` gives them)
    -> model input, resized as the policy's decoder resizes: the inputs a store's images had."""
    if policy.decoder in ("torch", "device") and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
        return prepare_tensor(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), policy)
    return prepare_image(to_rgb(Image.fromarray(pixels)), policy)


def prepare_tensor(pixels: torch.Tensor, policy: ImagePolicy) -> Prepared:
    """An upright [3, H, W] uint8 tensor -> model input with its geometry, as `prepare_image` makes
    it from the same pixels. torch's antialiased bicubic kernel is Pillow's filter where the source
    box starts on a pixel; a box that starts between pixels (a centre crop of an odd margin) is
    resized by Pillow. At a crop's two edge columns Pillow's filter also reads pixels past the
    crop, torch's does not: 0.01/255 on average at 224², 0.08 at 32² (two columns of 32)."""
    height, width = pixels.shape[1:]
    (out_h, out_w), (y0, x0, y1, x1) = input_geometry(height, width, policy)
    if policy.resize == "pad":  # no resampling: the decoded pixels are the input
        return as_input(pixels, policy, (height, width), (y0, x0, y1, x1))
    if policy.resample != "bicubic" or not all(float(v).is_integer() for v in (y0, x0, y1, x1)):
        return prepare_image(Image.fromarray(pixels.permute(1, 2, 0).numpy()), policy)
    crop = pixels[None, :, int(y0) : int(y1), int(x0) : int(x1)].contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(crop, size=(out_h, out_w), mode="bicubic", antialias=True)[0].contiguous()
    return as_input(resized, policy, (height, width), (y0, x0, y1, x1))


def prepare_image(image: Image.Image, policy: ImagePolicy, *, original: tuple[int, int] | None = None, scale: int = 1) -> Prepared:
    """A decoded upright RGB image -> normalized model input with its geometry. `original`
    (height, width) and `scale`: the image was decoded at 1/scale of that size (`decode_scaled`);
    the geometry and what the manifest records stay in the original's pixels."""
    height, width = original or (image.height, image.width)
    (out_h, out_w), (y0, x0, y1, x1) = input_geometry(height, width, policy)
    if policy.resize == "pad":
        resized = image
    elif policy.resample == "cv2-bilinear":  # what cv2.resize does by default, on 8-bit pixels: its fixed-point rounding included
        resized = cv2.resize(np.asarray(image), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    else:
        resized = image.resize((out_w, out_h), RESAMPLE, box=(x0 / scale, y0 / scale, x1 / scale, y1 / scale))
    # numpy, not torch: this runs on every decode thread at once, and each torch op there would
    # start a team of torch's intra-op threads of its own (up to 1.4x the decode rate side by side).
    pixels = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
    return as_input(torch.from_numpy(pixels), policy, (height, width), (y0, x0, y1, x1))


def as_input(pixels: torch.Tensor, policy: ImagePolicy, original: tuple[int, int], region: tuple[float, float, float, float]) -> Prepared:
    """Resized [3, h, w] uint8 pixels (on any device) as the model input, padded where the policy
    pads; `original` is the upright (height, width) and `region` the part of it shown."""
    (height, width), (y0, x0, _, _) = original, region
    valid = None
    if policy.resize == "pad":  # `normalize` zeroes what lies outside `valid`: the padding is the mean colour
        (out_h, out_w), _ = input_geometry(height, width, policy)
        top, left = round(-y0), round(-x0)
        margins = (left, out_w - left - width, top, out_h - top - height)
        pixels = F.pad(pixels, margins)
        valid = F.pad(torch.ones((1, height, width), device=pixels.device), margins)
    return Prepared(
        pixels=pixels,
        height=height,
        width=width,
        region=region,
        bucket=None if policy.resize == "square" else f"{pixels.shape[1]}x{pixels.shape[2]}",
        input_size=(pixels.shape[1], pixels.shape[2]),
        mean=policy.mean,
        std=policy.std,
        valid=valid,
    )


def cell_to_pixel(
    i: float, j: float, *, stride: int, input_size: tuple[int, int], region: tuple[float, float, float, float]
) -> tuple[float, float]:
    """Centre of feature cell (i, j) at `stride`, in original image pixels (y, x)."""
    y0, x0, y1, x1 = region
    return (
        y0 + (i + 0.5) * stride * (y1 - y0) / input_size[0],
        x0 + (j + 0.5) * stride * (x1 - x0) / input_size[1],
    )


def to_original(values: np.ndarray, *, height: int, width: int, region: tuple[float, float, float, float]) -> np.ndarray:
    """A 2-D map over the model input (at any resolution) -> the original's pixel grid by nearest
    neighbour, for masks and labels; pixels outside the region shown to the model are 0. A region
    may reach past the image (a padded input): that part is dropped."""
    top, left, bottom, right = (round(v) for v in region)
    resized = np.asarray(Image.fromarray(values).resize((right - left, bottom - top), Image.Resampling.NEAREST))
    canvas = np.zeros((height, width), dtype=values.dtype)
    inside = (slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width)))
    canvas[inside] = resized[inside[0].start - top : inside[0].stop - top, inside[1].start - left : inside[1].stop - left]
    return canvas


def from_original(values: np.ndarray, *, region: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The inverse of `to_original`: the region shown to the model, resized to `size` (h, w) by
    nearest neighbour (labels stay labels); parts of a region past the image are 0."""
    top, left, bottom, right = (round(v) for v in region)
    height, width = values.shape
    padded = np.pad(values, ((max(-top, 0), max(bottom - height, 0)), (max(-left, 0), max(right - width, 0))))
    cropped = padded[max(top, 0) : max(top, 0) + bottom - top, max(left, 0) : max(left, 0) + right - left]
    return np.asarray(Image.fromarray(cropped).resize((size[1], size[0]), Image.Resampling.NEAREST))
