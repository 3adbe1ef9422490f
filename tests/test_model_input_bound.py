"""--max-tokens bounds the model input under every resize policy: a pixel limit alone does not
(--resize aspect makes a 1 x 60,000 image a 224 x 13,440,000 input). Extraction makes such an
image a too_large error row; srt-query --image refuses it in one line; srt-serve answers 413
(tests/test_serve.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.commands.query import main as query_main
from pipeline.extraction.config import ExtractConfig, resolve
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.images import ImageError, ImagePolicy, prepare
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import DescriptorSpec, build_index, save_index
from tests.images_factory import encode, gradient, write_files
from tests.test_extract_local import config

SLIVER = encode(Image.new("RGB", (600, 2), (40, 90, 200)), "PNG")  # 2 x 600: 1,200 pixels


@pytest.mark.parametrize(("resize", "size"), [("aspect", 32), ("aspect-floor64", 64), ("pad", 32), ("square", 32)])
@pytest.mark.parametrize("decoder", ["pillow", "torch"])
def test_every_policy_refuses_an_input_over_the_bound_and_keeps_the_rest(resize, size, decoder):
    policy = ImagePolicy(size, resize, 16, (0.5,) * 3, (0.5,) * 3, max_tokens=64, decoder=decoder)
    photo = encode(gradient(48, 64), "JPEG")
    assert prepare(photo, policy).pixels.shape[0] == 3
    wide = encode(gradient(8, 1200), "JPEG")
    if resize == "square":  # a centre crop: always size x size, whatever the image
        assert prepare(wide, policy).input_size == (size, size)
        return
    with pytest.raises(ImageError, match=r"patches \(--resize .*\), over --max-tokens 64") as refused:
        prepare(wide, policy)
    assert refused.value.kind == "too_large"


def test_extraction_makes_such_an_image_a_too_large_row(tmp_path, sample_paths):
    folder = tmp_path / "images"
    write_files(folder, {"photo.jpg": sample_paths[0].read_bytes(), "sliver.png": SLIVER})
    out = tmp_path / "out.zarr"
    summary = run_local(config(str(folder), str(out), resize="aspect", max_tokens=100))
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in FeatureStore.open(str(out)).manifest.to_pylist()}
    assert rows["photo.jpg"]["status"] == "ok" and rows["sliver.png"]["error_kind"] == "too_large"
    assert "over --max-tokens 100" in rows["sliver.png"]["error"] and dict(summary.errors) == {"too_large": 1}


def test_a_bound_below_the_smallest_input_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--max-tokens: 3 is below the 4 patches of the smallest --image-size 32 input"):
        resolve(config(str(tmp_path), str(tmp_path / "o.zarr"), max_tokens=3))


def test_the_default_bound_leaves_earlier_stores_fingerprint_alone(tmp_path):
    default, custom = (resolve(config(str(tmp_path), str(tmp_path / "o.zarr"), **extra)).fingerprint() for extra in ({}, {"max_tokens": 500}))
    assert "max_tokens" not in default and custom["max_tokens"] == 500


def test_srt_query_refuses_such_an_image_in_one_line(tmp_path, sample_paths, capsys):
    folder = tmp_path / "images"
    write_files(folder, {p.name: p.read_bytes() for p in sample_paths})
    (tmp_path / "sliver.png").write_bytes(SLIVER)
    store = str(tmp_path / "store.zarr")
    run_local(ExtractConfig(**{**config(str(folder), store).__dict__, "resize": "aspect", "max_tokens": 100}))
    index = str(tmp_path / "store.index")
    save_index(build_index(FeatureStore.open(store), DescriptorSpec("pooled")), index)
    with pytest.raises(SystemExit) as exited:
        query_main(["--index", index, "--image", str(tmp_path / "sliver.png")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and "sliver.png" in error and "over --max-tokens 100" in error, error
