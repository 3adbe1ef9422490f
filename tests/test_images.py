"""Decoding policy and geometry: every awkward input becomes RGB or a named error."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extraction.images import (
    ImageError,
    ImagePolicy,
    cell_to_pixel,
    decode,
    decode_scaled,
    decode_tensor,
    encoded,
    from_original,
    input_geometry,
    prepare,
    prepare_array,
    to_original,
)
from tests.images_factory import BOMB_LIMIT, bad_input_files, encode, gradient

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("name", sorted(bad_input_files()))
def test_each_awkward_input_decodes_to_rgb_or_a_named_error(name):
    data, kind, upright = bad_input_files()[name]
    if kind is None:
        image = decode(data, BOMB_LIMIT)
        assert image.mode == "RGB" and (image.height, image.width) == upright
    else:
        with pytest.raises(ImageError) as caught:
            decode(data, BOMB_LIMIT)
        assert caught.value.kind == kind


def test_bomb_error_names_the_flag():
    data = bad_input_files()["bomb.png"][0]
    with pytest.raises(ImageError, match=r"1200x1000 = 1200000 pixels exceeds --max-pixels 1000000"):
        decode(data, BOMB_LIMIT)
    assert decode(data, 2_000_000).size == (1200, 1000)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data behind it."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")  # length(4) "IHDR" width(4) height(4) ... crc(4) over type + 13 bytes
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_max_pixels_governs_above_pillows_own_limit():
    claimed = png_claiming(14_000, 14_000)  # 196 M pixels: over twice Pillow's default limit of 89.5 M
    with pytest.raises(ImageError, match="exceeds --max-pixels 100000000") as small:
        decode(claimed, max_pixels=100_000_000)
    assert small.value.kind == "too_large"
    with pytest.raises(ImageError) as large:  # allowed by the flag: Pillow tries to decode it (no data)
        decode(claimed, max_pixels=200_000_000)
    assert large.value.kind == "decode"


def test_sixteen_bit_keeps_its_range_and_transparency_goes_white():
    sixteen = decode(encode(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "PNG"), BOMB_LIMIT)
    assert np.asarray(sixteen).min() == 255  # not clipped to a near-black 8-bit value
    clear = decode(bad_input_files()["rgba.png"][0], BOMB_LIMIT)
    assert np.asarray(clear).min() == 255


def test_exif_orientation_is_applied_to_the_pixels():
    upright = decode(bad_input_files()["rotated.jpg"][0], BOMB_LIMIT)
    stored = Image.open(__import__("io").BytesIO(bad_input_files()["rotated.jpg"][0])).convert("RGB")
    expected = stored.transpose(Image.Transpose.ROTATE_270)  # orientation 6 = rotate 90° clockwise
    assert np.abs(np.asarray(upright, dtype=int) - np.asarray(expected, dtype=int)).max() <= 2


@pytest.mark.parametrize(
    ("size", "expected_input", "expected_region"),
    [
        ((300, 450), (224, 224), (0.0, 75.0, 300.0, 375.0)),
        ((450, 300), (224, 224), (75.0, 0.0, 375.0, 300.0)),
        ((224, 224), (224, 224), (0.0, 0.0, 224.0, 224.0)),
    ],
)
def test_square_policy_is_a_centre_crop_of_the_shorter_side(size, expected_input, expected_region):
    policy = ImagePolicy(224, "square", 16, MEAN, STD)
    assert input_geometry(*size, policy) == (expected_input, expected_region)


@pytest.mark.parametrize(
    ("size", "expected_input"),
    [((300, 450), (224, 336)), ((450, 300), (336, 224)), ((100, 1000), (224, 2240)), ((1, 1), (224, 224)), ((300, 461), (224, 352))],
)
def test_aspect_policy_rounds_the_longer_side_to_the_patch(size, expected_input):
    policy = ImagePolicy(224, "aspect", 16, MEAN, STD)
    out, region = input_geometry(*size, policy)
    assert out == expected_input and region == (0.0, 0.0, float(size[0]), float(size[1]))
    assert out[0] % 16 == 0 and out[1] % 16 == 0


def test_prepare_normalizes_with_the_model_statistics():
    white = encode(Image.new("RGB", (64, 48), (255, 255, 255)), "PNG")
    prepared = prepare(white, ImagePolicy(32, "aspect", 16, MEAN, STD))
    assert prepared.tensor.shape == (3, 32, 48) and prepared.bucket == "32x48"
    torch.testing.assert_close(prepared.tensor, torch.full((3, 32, 48), (1 - 0.5) / 0.25))
    assert (prepared.height, prepared.width, prepared.region) == (48, 64, (0.0, 0.0, 48.0, 64.0))


def test_cell_to_pixel_maps_feature_cells_back_to_the_original():
    # A 300x450 image, centre-cropped to its middle 300x300 and resized to 224: stride-8 cells.
    region, size = (0.0, 75.0, 300.0, 375.0), (224, 224)
    assert cell_to_pixel(0, 0, stride=8, input_size=size, region=region) == pytest.approx((4 * 300 / 224, 75 + 4 * 300 / 224))
    assert cell_to_pixel(27, 27, stride=8, input_size=size, region=region) == pytest.approx((300 - 4 * 300 / 224, 375 - 4 * 300 / 224))


def test_aspect_floor64_with_cv2_bilinear_reads_frames_as_dinos_video_evaluation():
    # DINO's read_frame: the shorter side to 480, the longer to int(480 * long / short // 64 * 64),
    # cv2.resize (bilinear) on 8-bit pixels, /255, then (x - mean) / std with std 0.228 for red.
    mean, std = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
    policy = ImagePolicy(480, "aspect-floor64", 16, mean, std, resample="cv2-bilinear")
    assert input_geometry(480, 854, policy) == ((480, 832), (0.0, 0.0, 480.0, 854.0))  # a DAVIS frame
    assert input_geometry(854, 480, policy)[0] == (832, 480)
    assert input_geometry(500, 700, policy)[0] == (480, 640)  # 672 floored to 640
    rgb = np.asarray(gradient(100, 150, seed=4))
    prepared = prepare(encode(Image.fromarray(rgb), "PNG"), policy)
    resized = cv2.resize(rgb, (704, 480), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0  # 720 floored to 704
    expected = (resized - np.array(mean, np.float32)) / np.array(std, np.float32)
    assert prepared.bucket == "480x704"
    torch.testing.assert_close(prepared.tensor, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6, rtol=1e-6)


def test_pad_policy_centre_pads_like_dinov2_and_maps_back():
    policy = ImagePolicy(224, "pad", 14, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    # 41 x 57 -> 42 x 70: 1 row (0 above, 1 below), 13 columns (6 left, 7 right), as CenterPadding splits them.
    assert input_geometry(41, 57, policy) == ((42, 70), (0.0, -6.0, 42.0, 64.0))
    rgb = np.asarray(gradient(41, 57, seed=2))
    prepared = prepare(encode(Image.fromarray(rgb), "PNG"), policy)
    assert prepared.tensor.shape == (3, 42, 70) and prepared.bucket == "42x70"
    inside = (torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.25
    torch.testing.assert_close(prepared.tensor[:, 0:41, 6:63], inside)
    assert prepared.tensor[:, 41].abs().max() == 0 and prepared.tensor[:, :, :6].abs().max() == 0
    assert prepared.valid.shape == (1, 42, 70) and prepared.valid.sum() == 41 * 57 and prepared.valid[0, 0:41, 6:63].all()
    labels = (np.arange(41 * 57).reshape(41, 57) % 7).astype(np.uint8)
    on_input = from_original(labels, region=prepared.region, size=(42, 70))
    assert on_input.shape == (42, 70) and (on_input[0:41, 6:63] == labels).all() and on_input[41].max() == 0
    assert (to_original(on_input, height=41, width=57, region=prepared.region) == labels).all()


def photo_jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    """A smooth large photo-like JPEG (gradients under mild noise), optionally with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(gradient(height, width), "JPEG", quality=92, exif=exif.tobytes())


@pytest.mark.parametrize("resize", ["square", "aspect"])
@pytest.mark.parametrize(("orientation", "upright"), [(1, (1200, 1800)), (6, (1800, 1200))])
def test_reduced_jpeg_decoding_keeps_the_geometry_and_stays_close_to_a_full_decode(resize, orientation, upright):
    data = photo_jpeg(1800, 1200, orientation)
    full = ImagePolicy(224, resize, 16, MEAN, STD)
    reduced = dataclasses.replace(full, reducing_gap=2.0)
    image, size, scale = decode_scaled(data, 10_000_000, reduced.decoded_shorter_side)
    assert scale == 2 and size == upright and min(image.size) == 600  # 1200 / 448 leaves room for 1/2, not 1/4
    exact, fast = prepare(data, full), prepare(data, reduced)
    assert (fast.height, fast.width, fast.region, fast.input_size) == (exact.height, exact.width, exact.region, exact.input_size) == (*upright, exact.region, exact.input_size)
    difference = (fast.pixels.int() - exact.pixels.int()).abs()
    assert difference.float().mean() < 0.75 and difference.max() <= 4  # measured: 0.50 and 3


@pytest.mark.parametrize("data", [photo_jpeg(500, 375), encode(gradient(1200, 1800), "PNG")], ids=["small jpeg", "large png"])
def test_reducing_gap_leaves_what_it_cannot_reduce_exactly_as_decoded_in_full(data):
    full = ImagePolicy(224, "square", 16, MEAN, STD)
    reduced = dataclasses.replace(full, reducing_gap=2.0)
    assert decode_scaled(data, 10_000_000, reduced.decoded_shorter_side)[2] == 1
    assert torch.equal(prepare(data, reduced).pixels, prepare(data, full).pixels)


def test_reducing_gap_applies_only_where_pillow_resamples():
    for policy in (ImagePolicy(224, "pad", 14, MEAN, STD, reducing_gap=2.0), ImagePolicy(480, "aspect", 16, MEAN, STD, resample="cv2-bilinear", reducing_gap=2.0)):
        assert policy.decoded_shorter_side == 0
    assert ImagePolicy(224, "square", 16, MEAN, STD, reducing_gap=2.5).decoded_shorter_side == 560


TENSOR_DECODES = {"good.jpg", "rotated.jpg"}  # the 8-bit RGB and greyscale JPEGs of bad_input_files


@pytest.mark.parametrize("name", sorted(bad_input_files()))
def test_torch_decodes_plain_jpegs_and_leaves_the_rest_to_pillow(name):
    data, kind, upright = bad_input_files()[name]
    policy = ImagePolicy(32, "aspect", 16, MEAN, STD, max_pixels=BOMB_LIMIT, decoder="torch")
    pixels = decode_tensor(data, policy)
    assert (pixels is not None) == (name in TENSOR_DECODES)
    assert (encoded(data, policy) is not None) == (name in TENSOR_DECODES)
    if pixels is not None:  # bit-identical to Pillow's decode, upright
        assert torch.equal(pixels, torch.from_numpy(np.array(decode(data, BOMB_LIMIT))).permute(2, 0, 1))
    if kind is None:
        assert prepare(data, policy).input_size == prepare(data, dataclasses.replace(policy, decoder="pillow")).input_size
    else:
        with pytest.raises(ImageError) as caught:
            prepare(data, policy)
        assert caught.value.kind == kind


@pytest.mark.parametrize(
    ("size", "policy"),
    [
        ((376, 500), ImagePolicy(224, "square", 16, MEAN, STD)),  # an even margin: torch's resize
        ((375, 500), ImagePolicy(224, "square", 16, MEAN, STD)),  # an odd margin: the box starts between pixels, Pillow's resize
        ((375, 500), ImagePolicy(224, "aspect", 16, MEAN, STD)),
        ((500, 333), ImagePolicy(224, "aspect", 16, MEAN, STD)),
        ((120, 90), ImagePolicy(224, "aspect", 16, MEAN, STD)),  # upsampled
        ((41, 57), ImagePolicy(0, "pad", 14, MEAN, STD)),
        ((375, 500), ImagePolicy(480, "aspect-floor64", 16, MEAN, STD, resample="cv2-bilinear")),
    ],
    ids=["square-even", "square-odd", "aspect", "aspect-portrait", "aspect-up", "pad", "cv2-bilinear"],
)
def test_both_decoders_give_the_same_model_inputs(size, policy):
    """The same geometry and manifest facts, pixels within 0.1/255 on average (torch's antialiased
    bicubic against Pillow's: the same filter, computed with other rounding; at a crop's first and
    last columns Pillow's filter also reads pixels past the crop, torch's does not)."""
    data = encode(gradient(*size, seed=3), "JPEG", quality=90)
    assert decode_tensor(data, policy) is not None
    by_pillow, by_torch = prepare(data, policy), prepare(data, dataclasses.replace(policy, decoder="torch"))
    facts = ("height", "width", "region", "bucket", "input_size")
    assert [getattr(by_torch, f) for f in facts] == [getattr(by_pillow, f) for f in facts]
    difference = (by_torch.pixels.int() - by_pillow.pixels.int()).abs()
    assert difference.float().mean() <= 0.1 and difference[..., 3:-3].max() <= 2  # measured: 0.015, 1
    assert (by_torch.valid is None) == (by_pillow.valid is None)
    if by_pillow.valid is not None:
        assert torch.equal(by_torch.valid, by_pillow.valid)


@pytest.mark.parametrize("decoder", ["pillow", "torch", "device"])
def test_pixels_decoded_elsewhere_become_the_inputs_the_bytes_would(decoder):
    """Ray Data's `read_images` hands over decoded arrays: each decoder resizes them as it resizes its own."""
    data = encode(gradient(376, 500, seed=4), "JPEG", quality=90)
    policy = ImagePolicy(224, "square", 16, MEAN, STD, decoder=decoder)
    from_array, from_bytes = prepare_array(np.array(decode(data, BOMB_LIMIT)), policy), prepare(data, policy)
    assert torch.equal(from_array.pixels, from_bytes.pixels) and from_array.region == from_bytes.region
