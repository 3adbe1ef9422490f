"""--decoder device: JPEGs decoded in batches on the model's device give Pillow's very inputs.

These run on the CPU device, through the same code a GPU runs (nvJPEG replaces libjpeg-turbo
there; both decode as Pillow does)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.extraction import jpeg_library
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.device_decoding import decode_batches
from pipeline.extraction.images import ImageError, ImagePolicy, encoded, prepare, resolve_decoder
from pipeline.extraction.raydata import SRTPredictor
from pipeline.extraction.resample import resize
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from tests.images_factory import BOMB_LIMIT, bad_input_files, encode, gradient, write_files

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    """Noise (overshoots to clip: the worst case for rounding), an output size up or down on each
    axis, and a crop box of the whole image or of a fractional part of it."""
    height, width = (int(v) for v in rng.integers(6, 160, 2))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    size = tuple(int(v) for v in rng.integers(3, 200, 2))
    if rng.random() < 0.5:
        return pixels, size, (0.0, 0.0, float(height), float(width))
    y0, x0 = rng.uniform(0, height / 3), rng.uniform(0, width / 3)
    return pixels, size, (y0, x0, rng.uniform(y0 + 1, height), rng.uniform(x0 + 1, width))


def test_resize_is_pillows_bit_for_bit():
    """Both pass orders (Pillow runs the vertical pass first where the height shrinks by more than
    twice as many pixels as the width), upscaling, downscaling and fractional boxes."""
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(120):
        pixels, (out_h, out_w), (y0, x0, y1, x1) = random_case(rng)
        height, width = pixels.shape[:2]
        orders.add(height - out_h > 0 and height - out_h > (width - out_w) * 2)
        expected = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1)))
        got = resize(torch.from_numpy(pixels).permute(2, 0, 1), (out_h, out_w), (y0, x0, y1, x1))
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), ((height, width), (out_h, out_w), (y0, x0, y1, x1))
    assert orders == {True, False}


def test_resize_takes_a_batch_of_one_size():
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(rng.integers(0, 256, (4, 3, 75, 100), dtype=np.uint8))
    box = (0.0, 12.5, 75.0, 87.5)
    together = resize(batch, (32, 32), box)
    assert torch.equal(together, torch.stack([resize(image, (32, 32), box) for image in batch]))


@pytest.fixture(params=["torchcodec", "torchvision"])
def library(request, monkeypatch):
    """Each JPEG library the decoders may find (`jpeg_library`): TorchCodec, or torchvision.io where
    TorchCodec's image decoders do not load (an older torch)."""
    loaded = getattr(jpeg_library, request.param)()
    monkeypatch.setattr(jpeg_library, "LIBRARY", loaded)
    return loaded


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_as_pillow_turns_it(orientation, library):
    """TorchCodec turns each JPEG upright itself; torchvision does not on a GPU, so with it every
    JPEG not stored upright goes to Pillow."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(gradient(20, 36, seed=orientation), "JPEG", quality=95, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    policy = ImagePolicy(0, "pad", 1, MEAN, STD, decoder="device")  # a patch of one pixel: no padding, no resize
    item = encoded(data, policy)
    if library.orients or orientation == 1:
        assert (item.height, item.width) == expected.shape[:2]
        (decoded,) = decode_batches([item], policy, CPU)
    else:
        assert item is None
        decoded = prepare(data, dataclasses.replace(policy, decoder="torch"))
    assert np.array_equal(decoded.pixels.permute(1, 2, 0).numpy(), expected)


POLICIES = [
    ImagePolicy(32, "square", 16, MEAN, STD, decoder="device"),
    ImagePolicy(32, "aspect", 16, MEAN, STD, decoder="device"),
    ImagePolicy(0, "pad", 14, MEAN, STD, decoder="device"),
]


@pytest.mark.parametrize("policy", POLICIES, ids=[p.resize for p in POLICIES])
def test_a_batch_gives_the_inputs_pillow_gives(policy, library):
    """Odd and even crop margins, portrait and landscape, a repeated size (one resize for both), an
    EXIF-rotated photo (where the library turns it) and a greyscale one: pixels, geometry and
    padding exactly as Pillow's."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photos = [
        encode(gradient(75, 100, seed=1), "JPEG", quality=90),
        encode(gradient(75, 100, seed=2), "JPEG", quality=90),
        encode(gradient(76, 100, seed=3), "JPEG", quality=90),
        encode(gradient(100, 61, seed=4), "JPEG", quality=90, exif=exif.tobytes()),
        encode(gradient(40, 50, seed=5).convert("L"), "JPEG", quality=90),
    ]
    if not library.orients:
        del photos[3]  # goes to Pillow (test_every_exif_orientation_is_turned_as_pillow_turns_it)
    items = [encoded(data, policy) for data in photos]
    assert all(item is not None for item in items)
    by_device = decode_batches(items, policy, CPU)
    by_pillow = [prepare(data, dataclasses.replace(policy, decoder="pillow")) for data in photos]
    for got, expected in zip(by_device, by_pillow):
        facts = ("height", "width", "region", "bucket", "input_size")
        assert [getattr(got, f) for f in facts] == [getattr(expected, f) for f in facts]
        assert torch.equal(got.pixels, expected.pixels)
        assert (got.valid is None and expected.valid is None) or torch.equal(got.valid, expected.valid)


def test_an_image_the_device_cannot_decode_fails_alone():
    """A JPEG whose header reads but whose scan names a component it does not have: the batch is
    decoded image by image, the others still decode, and the broken one comes back as None for
    the host, which names it."""
    policy = POLICIES[0]
    good = encode(gradient(40, 40, seed=6), "JPEG", quality=90)
    broken = bytearray(good)
    broken[broken.index(b"\xff\xda") + 5] = 9  # start of scan: its first component's id
    items = [encoded(good, policy), encoded(bytes(broken), policy), encoded(good, policy)]
    assert all(item is not None for item in items)
    inputs = decode_batches(items, policy, CPU)
    assert inputs[1] is None and inputs[0] is not None and torch.equal(inputs[0].pixels, inputs[2].pixels)
    with pytest.raises(ImageError) as caught:
        prepare(bytes(broken), policy)
    assert caught.value.kind == "decode"


def test_what_the_device_does_not_decode_goes_to_the_host():
    policy = POLICIES[0]
    for name, (data, kind, _) in bad_input_files().items():
        if encoded(data, dataclasses.replace(policy, max_pixels=BOMB_LIMIT)) is None and kind is not None:
            with pytest.raises(ImageError):
                prepare(data, dataclasses.replace(policy, max_pixels=BOMB_LIMIT))
    cv2_policy = ImagePolicy(32, "aspect", 16, MEAN, STD, resample="cv2-bilinear", decoder="device")
    assert encoded(encode(gradient(40, 40), "JPEG"), cv2_policy) is None  # only Pillow's bicubic is reproduced
    assert encoded(encode(gradient(40, 40), "PNG"), policy) is None


def test_auto_is_the_device_decoder_beside_a_gpu_and_torch_elsewhere():
    assert resolve_decoder("auto", torch.device("cuda", 0)) == "device"
    assert resolve_decoder("auto", CPU) == "torch"
    assert resolve_decoder("torchvision", CPU) == "torch"  # stores written before TorchCodec
    assert resolve_decoder("pillow", torch.device("cuda", 0)) == "pillow"


def test_a_job_decoding_on_the_device_stores_what_pillow_would(tmp_path, library):
    """The whole job on the CPU device: JPEGs through the batch decode (one EXIF-rotated, two of one
    size), a PNG through Pillow, a broken JPEG named by the host; the same manifest and values as a
    job decoding everything with Pillow, bit for bit, with either JPEG library."""
    exif = Image.Exif()
    exif[0x0112] = 8
    photo = encode(gradient(75, 100, seed=1), "JPEG", quality=90)
    broken = bytearray(photo)
    broken[broken.index(b"\xff\xda") + 5] = 9
    files = {
        "a.jpg": photo,
        "b.jpg": encode(gradient(75, 100, seed=2), "JPEG", quality=90),
        "c.jpg": encode(gradient(61, 90, seed=3), "JPEG", quality=90, exif=exif.tobytes()),
        "d.png": encode(gradient(50, 40, seed=4), "PNG"),
        "e.jpg": bytes(broken),
    }
    write_files(tmp_path / "images", files)
    stores = {}
    for decoder in ("device", "pillow"):
        out = str(tmp_path / f"{decoder}.zarr")
        run_local(ExtractConfig(dataset=str(tmp_path / "images"), out=out, model="vit_tiny_patch16_224", image_size=32, radius=1, stride=8, shard_size=4, batch_size=9, dtype="float32", decoder=decoder))
        stores[decoder] = FeatureStore.open(out)
    rows = {name: store.manifest.sort_by("uri").to_pylist() for name, store in stores.items()}
    facts = ("uri", "status", "error_kind", "height", "width", "region", "input_height", "input_width")
    assert [[row[f] for f in facts] for row in rows["device"]] == [[row[f] for f in facts] for row in rows["pillow"]]
    assert [row["error_kind"] for row in rows["device"]] == [None, None, None, None, "decode"]
    for by_device, by_pillow in zip(rows["device"], rows["pillow"]):
        if by_device["status"] == "ok":
            assert np.array_equal(stores["device"].dense(by_device["image_id"]), stores["pillow"].dense(by_pillow["image_id"]))
    assert stores["device"].config["decoder"] == "device"


def test_without_a_jpeg_library_pillow_decodes_to_the_same_inputs(monkeypatch, caplog):
    """Where neither TorchCodec's nor torchvision's JPEG decoder loads, every decoder hands its
    JPEGs to Pillow, saying so once per worker."""
    monkeypatch.setattr(jpeg_library, "LIBRARY", None)
    monkeypatch.setattr(jpeg_library, "LIBRARY_ERROR", "torchcodec: OSError: libtorch_cuda.so: cannot open shared object file")
    assert resolve_decoder("auto", torch.device("cuda", 0)) == "pillow"
    assert "Pillow decodes every image" in caplog.text and "libtorch_cuda.so" in caplog.text
    data = encode(gradient(75, 100, seed=1), "JPEG", quality=90)
    policy = POLICIES[1]
    assert encoded(data, policy) is None
    assert torch.equal(prepare(data, dataclasses.replace(policy, decoder="torch")).pixels, prepare(data, dataclasses.replace(policy, decoder="pillow")).pixels)


def test_ray_datas_predictor_decodes_a_batch_on_the_device_to_pillows_features():
    """`SRTPredictor` with encoded bytes: the batch's JPEGs go to the device together, the PNG and
    the broken file to the host; the same features and errors as Pillow gives."""
    batch = {"bytes": [encode(gradient(75, 100, seed=1), "JPEG", quality=90), encode(gradient(50, 40, seed=2), "PNG"), b"not an image", encode(gradient(61, 90, seed=3), "JPEG")]}
    flags = {"model": "vit_tiny_patch16_224", "image_size": 32, "radius": 1, "stride": 8, "column": "bytes", "outputs": ("pooled", "dense")}
    by_device = SRTPredictor(decoder="device", **flags)(dict(batch))
    by_pillow = SRTPredictor(decoder="pillow", **flags)(dict(batch))
    assert list(by_device["error"]) == list(by_pillow["error"]) and by_device["error"][2].startswith("decode:")
    for name in ("pooled", "dense"):
        assert np.array_equal(by_device[name], by_pillow[name])
