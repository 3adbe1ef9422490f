"""Model loading: random init, checkpoints in the formats people have, and clear refusals."""

from __future__ import annotations

import argparse
import hashlib
import math

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


# ---------------------------------------------------------------------------- position embeddings

DINO = "vit_small_patch16_224.dino"


def dino_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding` written out (class entry first, learnt side M, an offset
    of 0.1, bicubic by a scale factor, no antialiasing), for a grid of (h, w) tokens."""
    side = round((table.shape[1] - 1) ** 0.5)
    if grid == (side, side):  # "if npatch == N and w == h: return self.pos_embed"
        return table
    patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(patches, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic")
    return torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def test_the_reference_rule_is_the_families_own():
    from pipeline.engine.positions import DINO_RULE, reference_rule

    assert reference_rule("vit_small_patch16_224.dino") == reference_rule("vit_base_patch8_224.dino") == DINO_RULE
    assert reference_rule("vit_small_patch14_dinov2.lvd142m") == reference_rule("vit_giant_patch14_dinov2") == DINO_RULE
    # DINOv2 with registers resizes to the grid with antialiasing (offset 0): timm's own rule
    assert reference_rule("vit_small_patch14_reg4_dinov2") is None
    assert reference_rule("vit_small_patch16_224") is None and reference_rule("deit_small_patch16_224") is None


def cubic(distance: float, a: float) -> float:
    """The cubic convolution kernel (Keys): torch's bicubic uses a = -0.75, its antialiased one -0.5."""
    x = abs(distance)
    return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0)


def test_the_dino_resize_samples_at_the_offset_scale_a_hand_case():
    """A table whose values are their column, resized from 8 to 13 columns. DINO's scale factor
    (13 + 0.1) / 8 samples column j at s = (j + 0.5) * 8 / 13.1 - 0.5 with the a = -0.75 cubic over
    columns floor(s) - 1 .. floor(s) + 2 (clamped to the table), computed here by hand; timm's
    resize to the grid samples at (j + 0.5) * 8 / 13 - 0.5 with the a = -0.5 cubic, which gives back
    a ramp exactly away from the borders."""
    from pipeline.engine.positions import DINO_RULE, ResizeRule, resize_table

    ramp = torch.arange(8.0).repeat(8, 1).reshape(1, 64, 1)
    table = torch.cat([torch.full((1, 1, 1), -1.0), ramp], dim=1)
    dino = resize_table(table, 1, (8, 8), (8, 13), DINO_RULE)
    assert dino.shape == (1, 1 + 8 * 13, 1) and dino[0, 0, 0] == -1.0  # the class entry is kept
    by_hand = []
    for j in range(13):
        source = (j + 0.5) * 8 / 13.1 - 0.5
        base = math.floor(source)
        by_hand.append(sum(cubic(source - (base + k), -0.75) * min(max(base + k, 0), 7) for k in (-1, 0, 1, 2)))
    torch.testing.assert_close(dino[0, 1:, 0].reshape(8, 13)[0], torch.tensor(by_hand), atol=1e-5, rtol=0)
    timm_rule = resize_table(table, 1, (8, 8), (8, 13), ResizeRule(offset=0.0, antialias=True))[0, 1:, 0].reshape(8, 13)[0]
    inside = [j for j in range(13) if 1 <= (j + 0.5) * 8 / 13 - 0.5 <= 6]
    torch.testing.assert_close(timm_rule[inside], torch.tensor([(j + 0.5) * 8 / 13 - 0.5 for j in inside]), atol=1e-5, rtol=0)
    assert torch.equal(resize_table(table, 1, (8, 8), (8, 8), DINO_RULE), table)  # the learnt grid: left as it is


@pytest.mark.parametrize("grid", [(3, 5), (6, 4), (14, 14)])
def test_features_at_any_size_follow_the_reference_forward(grid):
    """The model's blocks on tokens positioned by DINO's own resize, written out here, against the
    engine's tap with `reference`; `timm` gives timm's resize, and they differ off the native grid."""
    from pipeline.engine.models import Tap

    vit = load_vit(DINO, device="cpu")
    model, tap = vit.model, Tap("block", vit.depth - 1)
    images = torch.randn(2, 3, grid[0] * 16, grid[1] * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        patches = model.patch_embed(images)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), patches.flatten(1, 2)], dim=1) + dino_table(model.pos_embed, grid)
        for block in model.blocks:
            tokens = block(tokens)
        expected = model.norm(tokens)[:, 1:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
        vit.use_pos_embed_resize("reference")
        reference = vit.forward_taps(images, [tap], norm=True)[tap].grid
        vit.use_pos_embed_resize("timm")
        timm_resize = vit.forward_taps(images, [tap], norm=True)[tap].grid
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    if grid == (14, 14):
        assert torch.equal(reference, timm_resize)  # the native grid is never resized
    else:
        assert (reference - timm_resize).norm() > 1e-3 * reference.norm()


def test_families_whose_rule_is_timms_are_untouched():
    from pipeline.engine.models import Tap

    vit = load_vit("vit_small_patch14_reg4_dinov2", device="cpu")
    tap = Tap("block", 3)
    images = torch.randn(1, 3, 3 * 14, 5 * 14)
    with torch.no_grad():
        before = vit.forward_taps(images, [tap], norm=False)[tap].grid
        vit.use_pos_embed_resize("reference")
        assert torch.equal(vit.forward_taps(images, [tap], norm=False)[tap].grid, before)
    with pytest.raises(ValueError, match="must be one of"):
        vit.use_pos_embed_resize("dino")
