"""The SRT engine against its definition (SRT.md): naive chain, Bartlett property, identity, partitions."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.engine.aggregation import combine, finalize, pad_for_shifts, translate, views_between
from pipeline.engine.models import Tap
from pipeline.engine.reference import aggregate_naive, srt_naive, translate_naive
from pipeline.engine.shifts import grid_shifts, random_shifts, split_shifts, spread_order, validate_shifts
from pipeline.engine.srt import SRT, shift_ensemble
from tests.conftest import cached_vit, random_images

KEY = "tokens"


def conv_tokenizer(patch: int, channels: int = 5, seed: int = 0):
    """A ViT-like patch embedding (strided conv + nonlinearity): a cheap, shift-sensitive tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, patch, patch, generator=generator) / patch
    prefix_weight = torch.randn(2, channels, generator=generator)

    def tokenize(views: torch.Tensor) -> dict:
        grid = torch.tanh(F.conv2d(views, weight, stride=patch))
        prefix = torch.einsum("nc,pc->npc", grid.mean(dim=(2, 3)), prefix_weight)
        return {KEY: (grid, prefix)}

    return tokenize


def naive_with_tokenizer(images, tokenize, shifts, *, patch, stride, boundary):
    """The naive chain of reference.py, one view at a time, for an arbitrary tokenizer."""
    results = []
    for image in images:
        grids = [tokenize(translate_naive(image, d, boundary)[None])[KEY][0][0] for d in shifts]
        results.append(aggregate_naive(grids, shifts, patch=patch, stride=stride, boundary=boundary))
    return torch.stack(results)


def strides_for(patch: int) -> list[int]:
    return [s for s in (1, 2, 4, 7, patch) if patch % s == 0]


CASES = [(p, s) for p in (8, 14, 16) for s in strides_for(p)]


@pytest.mark.parametrize("boundary", ["reflect", "zeros"])
@pytest.mark.parametrize("shift_set", ["grid", "random"])
@pytest.mark.parametrize(("patch", "stride"), CASES)
def test_separable_aggregation_equals_naive_chain(patch, stride, shift_set, boundary):
    shifts = grid_shifts(2) if shift_set == "grid" else random_shifts(7, patch, seed=patch + stride)
    images = torch.randn(2, 3, 3 * patch, 2 * patch, generator=torch.Generator().manual_seed(patch))
    tokenize = conv_tokenizer(patch)
    fast = finalize(
        shift_ensemble(images, tokenize, shifts, patch=patch, stride=stride, boundary=boundary, batch_size=4),
        boundary,
    ).dense[KEY]
    naive = naive_with_tokenizer(images, tokenize, shifts, patch=patch, stride=stride, boundary=boundary)
    assert fast.shape == (2, 5, 3 * patch // stride, 2 * patch // stride)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("boundary", ["reflect", "zeros"])
def test_srt_of_each_model_family_equals_naive_chain(any_vit, boundary):
    """Real ViTs (CLS p16, registers p14, p8), non-square inputs, layer taps with final norm."""
    images = random_images(any_vit, rows=3, cols=2)
    shifts = random_shifts(5, any_vit.patch_size, seed=3) + [(0, 0)]
    stride = any_vit.patch_size // 2
    srt = SRT(any_vit, layers=(-1, 4), shifts=shifts, stride=stride, boundary=boundary, batch_size=4)
    out = srt(images)
    assert set(out) == {-1, 4}
    for layer in (-1, 4):
        naive = srt_naive(any_vit, images, layer=layer, shifts=shifts, stride=stride, boundary=boundary)
        torch.testing.assert_close(out[layer], naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("boundary", ["reflect", "zeros"])
@pytest.mark.parametrize("patch", [4, 8])
def test_bartlett_property_holds_exactly_in_the_interior(patch, boundary):
    """Patch-mean tokens, one full period of shifts, s = 1: a separable triangle filter of width 2p-1."""
    size = 6 * patch
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))

    def patch_mean(views):
        grid = F.avg_pool2d(views, patch)
        return {KEY: (grid, grid.new_zeros(grid.shape[0], 0, 3))}

    period = [(dy, dx) for dy in range(patch) for dx in range(patch)]
    srt = finalize(
        shift_ensemble(images, patch_mean, period, patch=patch, stride=1, boundary=boundary), boundary
    ).dense[KEY]

    box = torch.ones(patch, dtype=torch.float64) / patch
    triangle = torch.from_numpy(np.convolve(box.numpy(), box.numpy()))  # width 2p-1, sums to 1
    kernel = torch.outer(triangle, triangle).expand(3, 1, -1, -1)
    filtered = F.conv2d(images.double(), kernel, groups=3)  # valid part: centres p-1 .. size-p
    interior = slice(patch - 1, size - patch + 1)
    assert filtered.shape[-1] == size - 2 * patch + 2
    torch.testing.assert_close(srt[..., interior, interior].double(), filtered, atol=1e-5, rtol=0)


def test_single_zero_shift_at_token_stride_is_the_plain_feature_map(any_vit):
    images = random_images(any_vit, rows=2, cols=3)
    out = SRT(any_vit, layers=(-1, 2), shifts=[(0, 0)], stride=any_vit.patch_size).run(images)
    direct = any_vit.model.forward_intermediates(
        images, indices=[2, any_vit.depth - 1], norm=True, intermediates_only=True
    )
    for layer, expected in zip((2, any_vit.depth - 1), direct):
        torch.testing.assert_close(out.dense[Tap("block", layer)], expected, atol=0, rtol=0)
        torch.testing.assert_close(out.pooled[Tap("block", layer)], expected.mean(dim=(2, 3)), atol=1e-6, rtol=0)


def test_prefix_tokens_are_the_mean_over_views_and_kept_apart():
    vit = cached_vit("vit_small_patch14_reg4_dinov2")
    images = random_images(vit, rows=2, cols=2, batch=1)
    shifts = [(0, 0), (3, -5), (-7, 2)]
    out = SRT(vit, layers=(-1,), shifts=shifts, stride=14, boundary="zeros").run(images)
    tap = Tap("block", vit.depth - 1)
    assert out.prefix[tap].shape == (1, 5, vit.embed_dim)  # CLS + 4 registers
    per_view = [
        vit.forward_taps(translate_naive(images[0], d, "zeros")[None], [tap], norm=True)[tap].prefix
        for d in shifts
    ]
    torch.testing.assert_close(out.prefix[tap], torch.stack(per_view).mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("boundary", ["reflect", "zeros"])
def test_any_partition_of_the_shift_set_adds_up_to_the_whole(tiny_vit, boundary):
    shifts = grid_shifts(2) + [(0, 0), (0, 0), (5, -9)]  # duplicates are legitimate members
    srt = SRT(tiny_vit, layers=(-1, 5), keys=(-1,), shifts=shifts, stride=4, boundary=boundary, batch_size=6)
    images = random_images(tiny_vit, rows=2, cols=3)
    whole = srt.run(images)
    rng = random.Random(0)
    for parts in (1, 2, 5, len(shifts)):
        shuffled = rng.sample(shifts, len(shifts))
        pieces = split_shifts(shuffled, parts)
        result = srt.finalize(combine([srt.partial(images, piece) for piece in pieces]))
        assert result.n_views.tolist() == [len(shifts)] * len(images)
        for tap in srt.taps:
            torch.testing.assert_close(result.dense[tap], whole.dense[tap], atol=1e-5, rtol=0)
            torch.testing.assert_close(result.prefix[tap], whole.prefix[tap], atol=1e-5, rtol=0)
            torch.testing.assert_close(result.pooled[tap], whole.pooled[tap], atol=1e-5, rtol=0)


def test_split_shifts_covers_the_set_in_order():
    shifts = grid_shifts(2)
    for parts in range(1, len(shifts) + 1):
        pieces = split_shifts(shifts, parts)
        assert len(pieces) == parts and all(pieces)
        assert list(itertools.chain(*pieces)) == shifts
    with pytest.raises(ValueError, match="cannot split"):
        split_shifts(shifts, len(shifts) + 1)


def test_multi_layer_pass_equals_single_layer_passes(tiny_vit):
    images = random_images(tiny_vit, rows=2, cols=2)
    shifts = grid_shifts(1)
    together = SRT(tiny_vit, layers=(3, -1, 7), shifts=shifts, stride=8)(images)
    for layer in (3, -1, 7):
        alone = SRT(tiny_vit, layers=(layer,), shifts=shifts, stride=8)(images)[layer]
        torch.testing.assert_close(together[layer], alone, atol=1e-6, rtol=0)


def count_block_calls(vit, run) -> list[int]:
    calls = [0] * vit.depth
    hooks = [
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(vit.model.blocks)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def test_early_stop_runs_no_block_past_the_deepest_tap(tiny_vit):
    images = random_images(tiny_vit, rows=2, cols=2, batch=1)
    srt = SRT(tiny_vit, layers=(2, 5), shifts=grid_shifts(1), stride=16, batch_size=9)
    assert count_block_calls(tiny_vit, lambda: srt(images)) == [1] * 6 + [0] * 6
    keys_only = SRT(tiny_vit, layers=(1,), keys=(3,), shifts=[(0, 0)], stride=16)
    assert count_block_calls(tiny_vit, lambda: keys_only.run(images)) == [1] * 4 + [0] * 8


def test_keys_tap_is_the_attention_keys_of_the_block(tiny_vit):
    images = random_images(tiny_vit, rows=2, cols=3, batch=1)
    captured = {}
    attn = tiny_vit.model.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.setdefault("qkv", out))
    try:
        out = SRT(tiny_vit, layers=(-1,), keys=(-1,), shifts=[(0, 0)], stride=16).run(images)
    finally:
        hook.remove()
    keys = captured["qkv"].reshape(1, 1 + 6, 3, tiny_vit.embed_dim)[:, :, 1]  # [B, N, C]
    tap = Tap("keys", tiny_vit.depth - 1)
    torch.testing.assert_close(out.prefix[tap], keys[:, :1], atol=0, rtol=0)
    torch.testing.assert_close(out.dense[tap], keys[:, 1:].reshape(1, 2, 3, -1).permute(0, 3, 1, 2), atol=0, rtol=0)


def test_bf16_autocast_accumulates_in_fp32_and_stays_close(tiny_vit):
    images = random_images(tiny_vit, rows=2, cols=2, batch=1)
    exact = SRT(tiny_vit, shifts=grid_shifts(1), stride=4)(images)[-1]
    mixed = SRT(tiny_vit, shifts=grid_shifts(1), stride=4, autocast=torch.bfloat16)(images)[-1]
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_shift_set_builders():
    assert grid_shifts(0) == [(0, 0)]
    assert len(grid_shifts(3)) == 49 and len(set(grid_shifts(3))) == 49
    drawn = random_shifts(20, 16, seed=4)
    assert drawn == random_shifts(20, 16, seed=4) != random_shifts(20, 16, seed=5)
    assert len(set(drawn)) == 20 and all(abs(v) < 16 for d in drawn for v in d)
    assert len(set(random_shifts(9, 2, seed=0))) == 9  # the whole 3x3 lattice of p = 2
    assert validate_shifts([(0, 0), (0, 0)], 16) == ((0, 0), (0, 0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shifts": [(0, 16)]}, r"shift \(0, 16\) is not sub-token.*< the patch size 16"),
        ({"shifts": [(-16, 0)]}, "not sub-token"),
        ({"shifts": []}, "shift set is empty"),
        ({"shifts": [(0.5, 0)]}, "pair of ints"),
        ({"stride": 3}, r"stride 3 must divide the patch size 16: use one of \[1, 2, 4, 8, 16\]"),
        ({"stride": 0}, "must divide"),
        ({"layers": (12,)}, r"layer 12 is out of range .* 12 blocks: use 0..11 or -12..-1"),
        ({"layers": (-13,)}, "out of range"),
        ({"keys": (20,)}, "out of range"),
        ({"layers": ()}, "at least one layer"),
        ({"boundary": "wrap"}, r"boundary must be one of \('reflect', 'zeros'\)"),
        ({"batch_size": 0}, "batch_size"),
        ({"autocast": torch.float64}, "autocast"),
    ],
)
def test_bad_engine_arguments_say_what_to_change(tiny_vit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SRT(tiny_vit, **kwargs)


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.zeros(3, 32, 32), ValueError, r"\[B, 3, H, W\]"),
        (torch.zeros(1, 1, 32, 32), ValueError, r"\[B, 3, H, W\]"),
        (torch.zeros(1, 3, 32, 40), ValueError, "32x40 must be a positive multiple of .* patch size 16"),
        (torch.zeros(1, 3, 8, 8), ValueError, "multiple"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "normalized float tensor.*mean="),
    ],
)
def test_bad_inputs_say_what_to_change(tiny_vit, images, error, message):
    with pytest.raises(error, match=message):
        SRT(tiny_vit, shifts=[(0, 0)])(images)
    with pytest.raises(ValueError, match="not sub-token"):
        SRT(tiny_vit).partial(torch.zeros(1, 3, 32, 32), shifts=[(0, 20)])


def test_adaptive_views_with_zero_tolerance_are_the_full_set(tiny_vit):
    images = random_images(tiny_vit, rows=2, cols=3)
    full = SRT(tiny_vit, layers=(-1, 4), shifts=grid_shifts(2), stride=4).run(images)
    adaptive = SRT(tiny_vit, layers=(-1, 4), shifts=grid_shifts(2), stride=4, tolerance=0.0).run(images)
    assert adaptive.n_views.tolist() == [25, 25]
    for tap in full.dense:
        torch.testing.assert_close(adaptive.dense[tap], full.dense[tap], atol=1e-5, rtol=0)
        torch.testing.assert_close(adaptive.prefix[tap], full.prefix[tap], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("boundary", "views_of_constant"), [("reflect", 8), ("zeros", 49)])
def test_adaptive_views_stop_at_the_minimum_on_a_constant_image(tiny_vit, boundary, views_of_constant):
    """A constant image looks the same through every reflect-filled view, so its mean stops moving at
    once; with zero fill each shift shows a different 0 strip, so the mean keeps moving."""
    constant = torch.full((1, 3, 64, 48), 0.3)
    busy = random_images(tiny_vit, rows=4, cols=3, batch=1)
    srt = SRT(tiny_vit, shifts=grid_shifts(3), stride=4, boundary=boundary, tolerance=1e-2, min_views=8, check_every=4)
    out = srt.run(torch.cat([constant, busy]))
    assert out.n_views.tolist()[0] == views_of_constant
    assert out.n_views.tolist()[1] > 8, "a textured image keeps adding views"
    alone = srt.run(busy)  # per-image decisions do not depend on the batch
    torch.testing.assert_close(out.dense[srt.taps[0]][1:], alone.dense[srt.taps[0]], atol=1e-5, rtol=0)


def test_spread_order_visits_distant_phases_first():
    order = spread_order(grid_shifts(3), 16)
    assert order[0] == (0, 0) and sorted(order) == sorted(grid_shifts(3))
    assert set(order[1:5]) == {(-3, -3), (-3, 3), (3, -3), (3, 3)}  # the corners: farthest from (0, 0)
    with pytest.raises(ValueError, match="cannot be split"):
        SRT(cached_vit("vit_tiny_patch16_224"), tolerance=0.01).partial(torch.zeros(1, 3, 32, 32), shifts=[(0, 0)])


def test_default_shift_set_is_16_random_lattice_shifts(any_vit):
    assert SRT(any_vit).shifts == tuple(random_shifts(16, any_vit.patch_size, seed=0))


@pytest.mark.parametrize("boundary", ["reflect", "zeros"])
def test_output_ensemble_averages_the_heads_outputs_over_views(tiny_vit, boundary):
    """Against the naive chain run on the head's per-view outputs: a non-linear head's average is
    not the head of the average (the paper's comparison); a linear head's is."""
    images = random_images(tiny_vit, 3, 4, batch=2, seed=5)
    shifts = [(0, 0), (3, -5), (-7, 2), (9, 9)]
    srt = SRT(tiny_vit, layers=(6,), shifts=shifts, stride=4, boundary=boundary)
    conv = torch.nn.Conv2d(tiny_vit.embed_dim, 5, 1).eval()
    torch.nn.init.normal_(conv.weight, std=0.5)

    def nonlinear(grid: torch.Tensor) -> torch.Tensor:
        return conv(grid).softmax(dim=1)

    tap = Tap("block", 6)
    with torch.no_grad():
        for head in (conv, nonlinear):
            expected = torch.stack([
                aggregate_naive(
                    [head(tiny_vit.forward_taps(translate_naive(image, s, boundary)[None], [tap], norm=True)[tap].grid)[0] for s in shifts],
                    shifts, patch=16, stride=4, boundary=boundary,
                )
                for image in images
            ])  # fmt: skip
            torch.testing.assert_close(srt.output_ensemble(images, head), expected, atol=1e-5, rtol=1e-5)
        feature_space = srt(images)[6]
        if boundary == "reflect":  # each cell a weighted mean with weights summing to 1: affine heads commute
            torch.testing.assert_close(conv(feature_space), srt.output_ensemble(images, conv), atol=1e-5, rtol=1e-5)
        assert (nonlinear(feature_space) - srt.output_ensemble(images, nonlinear)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="the head must keep the token grid"):
        srt.output_ensemble(images, lambda grid: grid.mean(dim=(2, 3)))


@pytest.mark.parametrize("stride", [16, 4])
def test_views_padded_after_shifting_match_the_naive_chain(tiny_vit, stride):
    """DINOv2's depth path: shift the image at its own size, then centre-pad each view. The engine
    runs on the padded canvas with each view masked to the real pixels."""
    image = torch.randn(1, 3, 41, 57, generator=torch.Generator().manual_seed(9))
    pads = (3, 4, 3, 4)  # top, bottom, left, right: 41 -> 48, 57 -> 64
    canvas = F.pad(image, (pads[2], pads[3], pads[0], pads[1]))
    valid = F.pad(torch.ones(1, 1, 41, 57), (pads[2], pads[3], pads[0], pads[1]))
    shifts = [(0, 0), (3, -5), (-7, 2), (9, 9), (0, 0)]
    srt = SRT(tiny_vit, layers=(6,), shifts=shifts, stride=stride, boundary="zeros", norm=False)
    naive = srt_naive(tiny_vit, image, layer=6, shifts=shifts, stride=stride, boundary="zeros", norm=False, pad_after_shift=pads)
    engine = srt.finalize(srt.partial(canvas, valid=valid)).dense[Tap("block", 6)]
    torch.testing.assert_close(engine, naive, atol=1e-5, rtol=1e-5)
    unmasked = srt.finalize(srt.partial(canvas)).dense[Tap("block", 6)]  # content shifted into the padding kept
    assert (unmasked - naive).abs().max() > 1e-3


@pytest.mark.parametrize(("start", "end"), [(0, 12), (0, 5), (2, 3), (3, 10), (5, 12), (1, 11)])
def test_views_between_cuts_any_run_of_image_major_views(start, end):
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    shifts = [(0, 0), (1, -1), (-2, 1), (2, 2)]
    padded, pad = pad_for_shifts(images, shifts, "reflect")
    expected = torch.stack([translate(padded[i // 4], pad, shifts[i % 4], (8, 8)) for i in range(start, end)])
    assert torch.equal(views_between(padded, pad, shifts, (8, 8), start, end), expected)
