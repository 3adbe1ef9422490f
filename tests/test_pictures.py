"""PCA pictures: deterministic colours, expected sizes, and the job end to end."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.commands.visualize import main as visualize_main
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from pipeline.tasks.pictures import LABEL_HEIGHT, TILE, pca_rgb
from tests.test_extract_local import config


def test_pca_colours_are_deterministic_and_follow_the_main_direction():
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(16)
    ramp = np.linspace(-1, 1, 20)
    # Cells along one direction (a ramp left to right) plus small noise: the first component is the ramp.
    maps = [np.einsum("c,w->cw", direction, ramp)[:, None, :].repeat(5, axis=1) + 0.01 * rng.standard_normal((16, 5, 20)) for _ in range(2)]
    first, second = pca_rgb(maps), pca_rgb(maps)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape == (5, 20, 3) and first[0].min() >= 0 and first[0].max() <= 1
    red = first[0][..., 0].mean(axis=0)
    assert abs(np.corrcoef(red, ramp)[0, 1]) > 0.99, "the first channel follows the ramp"
    flipped = pca_rgb([-m for m in maps])  # SVD sign ambiguity: fixed signs give mirrored, not random, colours
    np.testing.assert_allclose(flipped[0][..., 0], 1 - first[0][..., 0], atol=1e-6)


def test_visualize_writes_one_row_of_three_tiles_per_image(tmp_path, sample_paths):
    out = str(tmp_path / "store.zarr")
    run_local(config(str(sample_paths[0].parent), out))
    store = FeatureStore.open(out)
    ids = store.manifest.column("image_id").to_pylist()[:2]
    png = tmp_path / "picture.png"
    argv = ["--store", out, "--out", str(png), "--image-id", ids[0], "--image-id", ids[1]]
    assert visualize_main(argv) == 0
    first = png.read_bytes()
    picture = Image.open(io.BytesIO(first))
    assert picture.size == (3 * TILE, LABEL_HEIGHT + 2 * TILE)  # square inputs: square tiles, under the columns' names
    strip = np.asarray(picture.convert("L"))[:LABEL_HEIGHT]
    assert all((strip[:, x * TILE : (x + 1) * TILE] < 128).any() for x in range(3)), "each column is named"
    visualize_main(argv)
    assert png.read_bytes() == first, "the same store gives the same picture"
