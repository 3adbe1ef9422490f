"""Quality bench: what SRT buys per forward pass, on tasks with exact ground truth.

    python -m bench.quality                                   # seeded random-init ViTs
    python -m bench.quality --model vit_small_patch16_224 --weights dino_vits16.pth

Data: seeded images of textured random shapes on textured backgrounds, with exact masks and a
smooth "depth" (a height field from the signed distance to the shapes' boundaries). Protocol:
frozen features at a fine stride, a closed-form ridge probe per feature cell fitted on a train
split; scores on a test split: segmentation mIoU and boundary F, depth RMSE and RMSE-log. Rows:
plain features upsampled (nearest, bilinear), SRT grids n = 1..3, K random shifts, the zeros
boundary, output-space ensembling, adaptive views; each with its cost in forward passes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.draw import random_shapes
from skimage.segmentation import find_boundaries

from bench.results import table, write_section
from pipeline.engine.aggregation import PartialSum
from pipeline.engine.shifts import grid_shifts, random_shifts
from pipeline.engine.srt import SRT
from pipeline.extraction.weights import load_vit

BENCH = Path(__file__).resolve().parent
RIDGE = 0.01  # times the number of training cells, on standardized features
BOUNDARY_TOLERANCE = 2  # pixels


# ---------------------------------------------------------------------------- data


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] float in 0..1
    mask: np.ndarray  # [H, W] bool: inside a shape
    depth: np.ndarray  # [H, W] float in [1, 3]


def make_scene(size: int, seed: int) -> Scene:
    """Bright textured shapes on a dark textured background: telling them apart is easy, so the
    score is decided by how precisely features locate boundaries. The mask is exact, the depth smooth."""
    rng = np.random.default_rng(seed)
    shapes, _ = random_shapes((size, size), max_shapes=6, min_shapes=3, min_size=size // 8, max_size=size // 3, channel_axis=None, rng=seed, allow_overlap=True)
    mask = shapes < 255  # random_shapes paints shapes below 255 on a 255 background
    background = ndimage.gaussian_filter(rng.standard_normal((size, size, 3)), sigma=(size / 16, size / 16, 0))
    background = 0.25 + 0.08 * background / background.std() + 0.04 * rng.standard_normal((size, size, 3))
    colour = rng.uniform(0.6, 0.9, 3)
    stripes = 0.1 * np.sin(np.add.outer(np.arange(size) * rng.uniform(0.2, 0.6), np.arange(size) * rng.uniform(0.2, 0.6)))
    foreground = colour + stripes[..., None] + 0.05 * rng.standard_normal((size, size, 3))
    image = np.where(mask[..., None], foreground, background).clip(0, 1)
    signed = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
    depth = 2.0 + np.tanh(signed / (size / 16))
    return Scene(image.astype(np.float32), mask, depth.astype(np.float32))


def make_split(size: int, count: int, seed: int) -> list[Scene]:
    return [make_scene(size, seed * 10_000 + i) for i in range(count)]


# ---------------------------------------------------------------------------- metrics


def mean_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the two classes (background, shape) of intersection over union, over all pixels."""
    ious = []
    for value in (False, True):
        p, t = predicted == value, truth == value
        union = np.logical_or(p, t).sum()
        ious.append(np.logical_and(p, t).sum() / union if union else 1.0)
    return float(np.mean(ious))


def boundary_f(predicted: np.ndarray, truth: np.ndarray, tolerance: int = BOUNDARY_TOLERANCE) -> float:
    """F-score of boundary pixels, a match being within `tolerance` pixels (chessboard distance)."""
    pb, tb = find_boundaries(predicted, mode="inner"), find_boundaries(truth, mode="inner")
    if not pb.any() and not tb.any():
        return 1.0
    if not pb.any() or not tb.any():
        return 0.0
    structure = np.ones((2 * tolerance + 1,) * 2, bool)
    precision = (pb & ndimage.binary_dilation(tb, structure)).sum() / pb.sum()
    recall = (tb & ndimage.binary_dilation(pb, structure)).sum() / tb.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def rmse(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - truth) ** 2)))


def rmse_log(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.log(np.clip(predicted, 1e-3, None)) - np.log(truth)) ** 2)))


# ---------------------------------------------------------------------------- probe


def cells(features: torch.Tensor) -> np.ndarray:
    """[B, C, h, w] -> [B*h*w, C]."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).numpy()


def cell_targets(scenes: list[Scene], stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Shape fraction and mean depth of every stride x stride cell."""
    mask = torch.tensor(np.stack([s.mask for s in scenes]), dtype=torch.float32)[:, None]
    depth = torch.tensor(np.stack([s.depth for s in scenes]))[:, None]
    return cells(F.avg_pool2d(mask, stride)).ravel(), cells(F.avg_pool2d(depth, stride)).ravel()


@dataclass
class Probe:
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # [C + 1, 2]: shape score, depth

    @classmethod
    def fit(cls, x: np.ndarray, targets: np.ndarray) -> Probe:
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
        gram = z.T @ z + RIDGE * len(z) * np.eye(z.shape[1])
        return cls(mean, std, np.linalg.solve(gram, z.T @ targets))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.hstack([(x - self.mean) / self.std, np.ones((len(x), 1))]) @ self.weights


def score(probe: Probe, features: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Predict at the feature stride, upsample bilinearly to pixels, score against exact truth."""
    batch, _, h, w = features.shape
    size = scenes[0].mask.shape[0]
    predicted = torch.tensor(probe(cells(features)).reshape(batch, h, w, 2)).permute(0, 3, 1, 2)
    full = F.interpolate(predicted.float(), size=(size, size), mode="bilinear", align_corners=False).numpy()
    shape, depth = full[:, 0] > 0.5, full[:, 1]
    truth_mask = np.stack([s.mask for s in scenes])
    truth_depth = np.stack([s.depth for s in scenes])
    return {
        "mIoU": mean_iou(shape, truth_mask),
        "boundary F": float(np.mean([boundary_f(p, t) for p, t in zip(shape, truth_mask)])),
        "RMSE": rmse(depth, truth_depth),
        "RMSE-log": rmse_log(depth, truth_depth),
    }


# ---------------------------------------------------------------------------- features


def normalized(scenes: list[Scene], vit) -> torch.Tensor:
    images = torch.tensor(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
    return (images - torch.tensor(vit.mean).view(1, 3, 1, 1)) / torch.tensor(vit.std).view(1, 3, 1, 1)


def nested_srt(srt: SRT, images: torch.Tensor, sets: dict[str, list]) -> dict[str, torch.Tensor]:
    """SRT maps for nested shift sets (each a prefix-superset of the last) from running sums:
    every view is computed once."""
    out: dict[str, torch.Tensor] = {}
    running: PartialSum | None = None
    done: list = []
    for name, shifts in sets.items():
        assert list(shifts[: len(done)]) == done, "shift sets must be nested"
        part = srt.partial(images, shifts[len(done) :])
        running = part if running is None else running + part
        done = list(shifts)
        out[name] = srt.finalize(running).dense[srt.taps[0]]
    return out


def features_for_rows(vit, layer: int, stride: int, images: torch.Tensor, tolerance: float) -> dict[str, tuple[torch.Tensor, float]]:
    """Every row's features [B, C, H/s, W/s] and its mean forward passes per image."""
    p = vit.patch_size
    rows: dict[str, tuple[torch.Tensor, float]] = {}
    plain = SRT(vit, layers=(layer,), shifts=[(0, 0)], stride=p)(images)[layer]
    rows["plain, nearest"] = (F.interpolate(plain, scale_factor=p // stride, mode="nearest"), 1)
    rows["plain, bilinear"] = (F.interpolate(plain, scale_factor=p // stride, mode="bilinear", align_corners=False), 1)
    reflect = SRT(vit, layers=(layer,), stride=stride, boundary="reflect")
    rings = {f"SRT grid n={n}": sorted(grid_shifts(n), key=lambda d: max(abs(d[0]), abs(d[1]))) for n in (1, 2, 3)}
    for name, maps in nested_srt(reflect, images, rings).items():
        rows[name] = (maps, len(rings[name]))
    drawn = random_shifts(32, p, seed=0)
    for name, maps in nested_srt(reflect, images, {f"SRT random K={k}": drawn[:k] for k in (4, 8, 16, 32)}).items():
        rows[name] = (maps, int(name.split("=")[1]))
    zeros = SRT(vit, layers=(layer,), shifts=grid_shifts(2), stride=stride, boundary="zeros")
    rows["SRT grid n=2, zeros boundary"] = (zeros(images)[layer], 25)
    for label, shifts in (("n=3", grid_shifts(3)), ("K=32", drawn)):
        adaptive = SRT(vit, layers=(layer,), shifts=shifts, stride=stride, tolerance=tolerance, min_views=8, check_every=4).run(images)
        rows[f"SRT adaptive over {label}, tol {tolerance}"] = (adaptive.dense[reflect.taps[0]], adaptive.n_views.float().mean().item())
    return rows


def evaluate_model(name: str, weights: str | None, layer: int, size: int, train: int, test: int, tolerance: float) -> list[list[object]]:
    vit = load_vit(name, weights=weights, device="cpu")
    stride = 4 if vit.patch_size % 4 == 0 else 2
    train_scenes, test_scenes = make_split(size, train, seed=1), make_split(size, test, seed=2)
    train_rows = features_for_rows(vit, layer, stride, normalized(train_scenes, vit), tolerance)
    test_rows = features_for_rows(vit, layer, stride, normalized(test_scenes, vit), tolerance)
    shape_t, depth_t = cell_targets(train_scenes, stride)
    targets = np.stack([shape_t, depth_t], axis=1)
    results = []
    plain_probe = None
    for row, (features, _) in train_rows.items():
        probe = Probe.fit(cells(features), targets)
        if row == "plain, nearest":
            plain_probe = probe
        test_features, views = test_rows[row]
        results.append([row, views, score(probe, test_features, test_scenes)])
    # Output-space ensembling: the plain-trained probe's predictions on every shifted view, aligned
    # back and averaged. The probe is linear, so that average is the plain probe applied to the SRT
    # map of the same views: it differs from feature-space SRT only in what the probe was fit on.
    ensembled = test_rows["SRT grid n=2"][0]
    results.append(["output-space ensemble, n=2", 25, score(plain_probe, ensembled, test_scenes)])
    return results, stride


def plot(path: Path, title: str, results: list[list[object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("mIoU", "RMSE")):
        for row, views, scores in results:
            marker = "s" if row.startswith("plain") else ("^" if "random" in row else ("*" if "adaptive" in row else "o"))
            axis.scatter(views, scores[metric], marker=marker)
            axis.annotate(row.replace("SRT ", ""), (views, scores[metric]), fontsize=6)
        axis.set_xscale("log")
        axis.set_xlabel("forward passes per image")
        axis.set_ylabel(metric + (" (higher is better)" if metric == "mIoU" else " (lower is better)"))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="timm ViT (repeatable); default: ViT-S/16 and ViT-S/14 DINOv2 with registers")
    parser.add_argument("--weights", default=None, help="checkpoint for --model (one model)")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.05, help="adaptive views tolerance")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = args.model or ["vit_small_patch16_224", "vit_small_patch14_reg4_dinov2"]
    sections = []
    for name in models:
        for size in args.sizes:
            size = size // 14 * 14 if "patch14" in name else size
            results, stride = evaluate_model(name, args.weights, args.layer, size, args.train, args.test, args.tolerance)
            picture = BENCH / f"quality_{name}_{size}.png"
            title = f"{name} ({'weights ' + args.weights if args.weights else 'random init'}), block {args.layer}, {size}², stride {stride}"
            plot(picture, title, results)
            rows = [[row, f"{views:.1f}", *(f"{s[m]:.4f}" for m in ("mIoU", "boundary F", "RMSE", "RMSE-log"))] for row, views, s in results]
            sections.append(f"### {title}\n\n{table(['features', 'forward passes', 'mIoU', 'boundary F', 'RMSE', 'RMSE-log'], rows)}\n\n![{name}]({picture.name})\n")
    sizes = "-".join(map(str, args.sizes))
    write_section(
        f"quality-{sizes}",
        f"Quality at {', '.join(f'{s}²' for s in args.sizes)}: what SRT buys per forward pass (synthetic shapes, exact ground truth)",
        f"{args.train} train and {args.test} test scenes per model and size; ridge probe (λ = {RIDGE} × training cells) per feature cell on "
        f"standardized features; predictions upsampled bilinearly to pixels; boundary F within {BOUNDARY_TOLERANCE} px.\n\n" + "\n".join(sections),
    )


if __name__ == "__main__":
    main()
