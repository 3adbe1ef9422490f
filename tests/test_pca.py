"""--pca-dims: the basis against an independent eigen-decomposition, the stored coefficients
against the engine's maps, the way back, resume, and the flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine import pca
from pipeline.extraction.config import resolve
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from tests.images_factory import write_files
from tests.test_extract_local import config, expected_features


def top_projector(cells: np.ndarray, dims: int) -> tuple[np.ndarray, float]:
    """Projector onto the top `dims` eigenvectors of the cells' covariance (numpy, float64), and
    their share of the variance: what a PCA must find, whatever the signs of its components."""
    values, vectors = np.linalg.eigh(np.cov(cells, rowvar=False))
    top = vectors[:, np.argsort(values)[::-1][:dims]]
    return top @ top.T, float(np.sort(values)[::-1][:dims].sum() / values.sum())


def test_the_basis_spans_the_top_principal_directions():
    rng = np.random.default_rng(0)
    cells = rng.standard_normal((3000, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) @ np.linalg.qr(rng.standard_normal((6, 6)))[0] + 7.0
    maps = [torch.from_numpy(cells[:2000].reshape(20, 10, 10, 6)).permute(0, 3, 1, 2), torch.from_numpy(cells[2000:].reshape(10, 10, 10, 6)).permute(0, 3, 1, 2)]
    basis = pca.fit(maps, 2)
    projector, explained = top_projector(cells, 2)
    components = basis.components.double().numpy()
    np.testing.assert_allclose(components @ components.T, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(components.T @ components, projector, atol=1e-6)
    assert basis.explained == pytest.approx(explained, rel=1e-6)
    np.testing.assert_allclose(basis.mean.numpy(), cells.mean(0), rtol=1e-6)
    # The way back is the orthogonal projection onto the mean + span of the components.
    back = pca.reconstruct(pca.project(maps[0].float(), basis), basis).permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    mean = cells.mean(0)
    np.testing.assert_allclose(back, (cells[:2000] - mean) @ projector + mean, atol=1e-3)


def test_a_basis_of_all_channels_reconstructs_exactly():
    maps = [torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(2))]
    basis = pca.fit(maps, 5)
    assert basis.explained == pytest.approx(1.0)
    torch.testing.assert_close(pca.reconstruct(pca.project(maps[0], basis), basis), maps[0], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_paths):
    folder = tmp_path_factory.mktemp("pca-photos")
    write_files(folder, {p.name: p.read_bytes() for p in sample_paths})
    return folder


def test_an_extraction_stores_coefficients_on_a_basis_of_its_first_shards(tmp_path, photos):
    cfg = config(str(photos), str(tmp_path / "pca.zarr"), pca_dims=4)
    summary = run_local(cfg)
    store = FeatureStore.open(cfg.out)
    sources = {str(p): p.read_bytes() for p in photos.glob("*.jpg")}
    ids = store.manifest.column("image_id").to_pylist()
    engine = {i: expected_features(sources[store.record(i)["uri"]], cfg) for i in ids}
    # The basis: the top 4 principal directions of the cells of the first two shards' maps.
    first = [i for i in ids if store.record(i)["shard"] in (0, 1)]
    cells = np.concatenate([engine[i]["dense"].reshape(engine[i]["dense"].shape[0], -1).T for i in first]).astype(np.float64)
    projector, explained = top_projector(cells, 4)
    basis = store.basis()
    components = basis.components.double().numpy()
    np.testing.assert_allclose(components.T @ components, projector, atol=1e-3)
    assert basis.explained == pytest.approx(explained, rel=1e-4)
    assert store.group.attrs["pca"]["L11"] == {"dims": 4, "explained_variance": basis.explained, "fitted_on_shards": [0, 1]}
    # Every image, later shards too: 4 channels, its engine map projected on that basis.
    for image_id in ids:
        stored = store.dense(image_id)
        expected = pca.project(torch.from_numpy(engine[image_id]["dense"])[None], basis)[0].numpy()
        assert stored.shape == (4, 4, 4)
        np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-3 * np.abs(expected).max())
        full = store.dense(image_id, full=True)
        assert full.shape == engine[image_id]["dense"].shape
        np.testing.assert_allclose(full, pca.reconstruct(torch.from_numpy(stored.astype(np.float32)), basis).numpy(), rtol=1e-6)
        np.testing.assert_allclose(store.vector("pooled", image_id), engine[image_id]["pooled"], rtol=2e-3, atol=2e-3)  # pooled keeps all channels
    assert summary.ok == len(ids)
    # A rerun resumes: nothing to do, the basis kept.
    again = run_local(cfg)
    assert again.shards_done == 0
    np.testing.assert_array_equal(FeatureStore.open(cfg.out).basis().components.numpy(), basis.components.numpy())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pca_dims": 192}, "must be 0 (off) or fewer than the model's 192 channels, got 192"),
        ({"pca_dims": -1}, "must be 0 (off) or fewer than the model's 192 channels, got -1"),
        ({"pca_dims": 8, "outputs": ("cls", "pooled")}, "reduces dense maps, and --outputs stores none"),
    ],
)
def test_bad_pca_flags_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        resolve(config("in", str(tmp_path / "out.zarr"), **overrides))
    assert error.value.flag == "--pca-dims" and message in str(error.value)
