"""Model loading: random init, checkpoints in the formats people have, and clear refusals."""

from __future__ import annotations

import argparse
import hashlib

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from pipeline.extraction.weights import load_vit
from tests.conftest import cached_vit

NAME = "vit_tiny_patch16_224"


def assert_same_weights(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


def test_model_facts_are_reported(any_vit):
    name = any_vit.name
    expected = {
        "vit_tiny_patch16_224": (16, 192, 12, 1),
        "vit_small_patch14_reg4_dinov2": (14, 384, 12, 5),
        "vit_small_patch8_224": (8, 384, 12, 1),
    }[name]
    assert (any_vit.patch_size, any_vit.embed_dim, any_vit.depth, any_vit.num_prefix_tokens) == expected
    assert len(any_vit.mean) == len(any_vit.std) == 3 and all(s > 0 for s in any_vit.std)
    assert any_vit.weights_id == "random:seed=0"
    assert any_vit.device.type in ("cpu", "cuda")


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_vit(NAME, seed=7, device="cpu")
    after = torch.rand(1)
    assert torch.equal(before, after), "loading a model must not consume the caller's random stream"
    assert_same_weights(a, load_vit(NAME, seed=7, device="cpu"))
    different = load_vit(NAME, seed=8, device="cpu")
    assert not torch.equal(a.model.cls_token, different.model.cls_token)


def test_arbitrary_input_sizes_work_through_position_embedding_interpolation(any_vit):
    p = any_vit.patch_size
    for rows, cols in ((1, 1), (3, 7), (5, 2)):
        tap = any_vit.taps([-1])[0]
        grid = any_vit.forward_taps(torch.randn(1, 3, rows * p, cols * p), [tap], norm=False)[tap].grid
        assert grid.shape == (1, any_vit.embed_dim, rows, cols)


def test_norm_flag_applies_the_final_norm(tiny_vit):
    tap = tiny_vit.taps([-1])[0]
    images = torch.randn(1, 3, 32, 32)
    raw = tiny_vit.forward_taps(images, [tap], norm=False)[tap]
    normed = tiny_vit.forward_taps(images, [tap], norm=True)[tap]
    tokens = torch.cat([raw.prefix, raw.grid.flatten(2).transpose(1, 2)], dim=1)
    expected = tiny_vit.model.norm(tokens)
    torch.testing.assert_close(normed.prefix, expected[:, :1], atol=1e-6, rtol=0)
    torch.testing.assert_close(normed.grid.flatten(2).transpose(1, 2), expected[:, 1:], atol=1e-6, rtol=0)


def test_safetensors_file_loads_and_is_fingerprinted(tmp_path):
    source = load_vit(NAME, seed=3, device="cpu")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = load_vit(NAME, weights=str(path), device="cpu")
    assert_same_weights(loaded, source)
    assert loaded.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_dino_style_checkpoint_through_fsspec_is_unwrapped():
    """teacher/student wrappers, module.backbone. prefixes, a projection head and saved args."""
    teacher = load_vit(NAME, seed=4, device="cpu")
    student = load_vit(NAME, seed=5, device="cpu")

    def wrapped(vit):
        state = {f"module.backbone.{k}": v for k, v in vit.model.state_dict().items()}
        state["module.head.mlp.0.weight"] = torch.randn(8, 192)
        return state

    checkpoint = {
        "student": wrapped(student),
        "teacher": wrapped(teacher),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
    }
    with fsspec.open("memory://ckpts/dino.pth", "wb") as handle:
        torch.save(checkpoint, handle)
    with pytest.warns(UserWarning, match="ignored 1 checkpoint weights"):
        loaded = load_vit(NAME, weights="memory://ckpts/dino.pth", device="cpu")
    assert_same_weights(loaded, teacher)


def test_plain_torch_state_dict_under_model_key_loads(tmp_path):
    source = load_vit(NAME, seed=6, device="cpu")
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.model.state_dict(), "optimizer": {}}, path)
    assert_same_weights(load_vit(NAME, weights=str(path), device="cpu"), source)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(cached_vit("vit_small_patch8_224").model.state_dict(), path)
    with pytest.raises((ValueError, RuntimeError)):
        load_vit(NAME, weights=str(path), device="cpu")
    partial = {k: v for k, v in load_vit(NAME, device="cpu").model.state_dict().items() if "blocks.11" not in k}
    torch.save(partial, path)
    with pytest.raises(ValueError, match=r"does not fit 'vit_tiny_patch16_224': missing \d+ weights"):
        load_vit(NAME, weights=str(path), device="cpu")


def test_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "config": {"lr": 1e-3}}, path)
    with pytest.raises(ValueError, match=r"no weights found; top-level keys are \['config', 'epoch'\]"):
        load_vit(NAME, weights=str(path), device="cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vit_does_not_exist", r"unknown timm model 'vit_does_not_exist'"),
        ("resnet18", r"'resnet18' is not a Vision Transformer"),
    ],
)
def test_models_the_engine_cannot_tap_are_named(name, message):
    with pytest.raises(ValueError, match=message):
        load_vit(name, device="cpu")


def test_pretrained_and_weights_together_are_refused():
    with pytest.raises(ValueError, match="either pretrained=True or weights"):
        load_vit(NAME, pretrained=True, weights="x.pt")
