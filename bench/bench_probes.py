"""Probe bench: the paper's task families from stores, plain against SRT, on synthetic scenes.

    python -m bench.bench_probes                         # seeded random-init ViT-S/16 (no weights here)
    python -m bench.bench_probes --weights dino_vits16.pth --model vit_small_patch16_224

Scenes (bench.quality) carry exact depth, masks, and boxes from the masks. Each row extracts a
training and a test store with the real job, trains linear probes with `srt-probe` (depth with
DINOv2's bins head and seg with a 1x1 conv, blocks 2, 5, 8, 11 with class tokens) and runs
`srt-discover` (LOST and TokenCut on the last block's keys). Rows: plain (one view, token stride),
SRT with 16 random shifts at half the token stride, and the depth preset (7 x 7 grid at token
stride, DINOv2's padding). For real data the same commands run on NYU-v2, ADE20K and VOC07
(README: Probes and object discovery).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.quality import make_scene
from bench.results import table, write_section
from pipeline.commands.discover import main as discover_main
from pipeline.commands.probe import main as probe_main
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.runner import run_local

BLOCKS = (2, 5, 8, 11)
ROWS = {
    "plain (1 view, stride 16)": {"shifts": ((0, 0),), "stride": 16},
    "SRT (16 random shifts, stride 8)": {"random_shifts": 16, "stride": 8},
    "srt-paper-depth preset (49 views, stride 16)": {"preset": "srt-paper-depth"},
}


def write_scene_dataset(root: Path, split: str, count: int, size: int, seed: int = 0) -> None:
    """images/, depth/ (16-bit PNG, millimetres), labels/ (0 unlabelled top rows, 1 background,
    2 shape: ADE20K's convention) and boxes.csv (the shapes' bounding box) of one split."""
    for folder in ("images", "depth", "labels"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    boxes = [["image", "x0", "y0", "x1", "y1"]]
    for i in range(count):
        scene = make_scene(size, seed=seed + 1000 * (split == "test") + i)
        Image.fromarray((scene.image * 255).astype(np.uint8)).save(root / "images" / split / f"scene{i}.png")
        Image.fromarray((scene.depth * 1000).astype(np.uint16)).save(root / "depth" / split / f"scene{i}.png")
        labels = 1 + scene.mask.astype(np.uint8)
        labels[:2] = 0
        Image.fromarray(labels).save(root / "labels" / split / f"scene{i}.png")
        rows, columns = np.nonzero(scene.mask)
        boxes.append([f"scene{i}.png", columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])
    with open(root / f"boxes_{split}.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--weights", default=None, help="checkpoint of real weights (default: seeded random init)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_probes_"))
    for split, count in (("train", args.train), ("test", args.test)):
        write_scene_dataset(root, split, count, args.size)
    common = {"model": args.model, "weights": args.weights, "image_size": args.size, "keys": (11,), "resize": "aspect"}
    results = []
    for row, flags in ROWS.items():
        key = row.split(" ")[0]
        started = time.perf_counter()
        stores = {}
        for split in ("train", "test"):
            stores[split] = str(root / f"{key}_{split}.zarr")
            layers = {} if "preset" in flags else {"layers": BLOCKS}
            resize = {"resize": "pad", "boundary": "zeros"} if "preset" in flags else {}
            run_local(ExtractConfig(dataset=str(root / "images" / split), out=stores[split], **{**common, **layers, **resize, **flags}))
        extracted = time.perf_counter() - started
        scores = {}
        for task, extra in (("depth", ["--truth", str(root / "depth"), "--max-depth", "5"]), ("segmentation", ["--truth", str(root / "labels"), "--num-classes", "2", "--reduce-zero-label"])):
            out = root / f"probe_{key}_{task}"
            argv = ["--task", task, "--train", stores["train"], "--test", stores["test"], "--names", key, "--cls", "--layers", ",".join(map(str, BLOCKS)), "--steps", str(args.steps), "--lr", "0.01", "--log-every", str(args.steps), "--out", str(out), "--local", *extra]
            probe_main(argv)
            scores[task] = json.loads((out / "scores.json").read_text())[key]
        discover_main(["--store", stores["test"], "--boxes", str(root / "boxes_test.csv"), "--method", "lost,tokencut", "--out", str(root / f"discover_{key}")])
        corloc = json.loads((root / f"discover_{key}" / "scores.json").read_text())
        depth, seg = scores["depth"], scores["segmentation"]
        results.append([row, f"{depth['rmse']:.4f}", f"{depth['rmse_log']:.4f}", f"{depth['abs_rel']:.4f}", f"{depth['a1']:.3f}", f"{100 * seg['mIoU']:.2f}", f"{100 * corloc['lost']['CorLoc']:.1f}", f"{100 * corloc['tokencut']['CorLoc']:.1f}", f"{extracted:.0f}"])
        print(" | ".join(results[-1]), flush=True)
    header = ["features", "RMSE", "RMSE-log", "AbsRel", "d<1.25", "mIoU %", "CorLoc LOST %", "CorLoc TokenCut %", "extraction s (train+test)"]
    weights = args.weights or "seeded random-init weights (no weights can be downloaded here): the figures test the plumbing, not the method"
    body = (
        f"{args.model}, {weights}; synthetic scenes of {args.size}² px, {args.train} training and {args.test} test images; "
        f"linear probes on blocks {','.join(map(str, BLOCKS))} with class tokens, {args.steps} steps; CorLoc on the test images "
        f"(IoU >= 0.5 as LOST counts it); CPU, 2 cores.\n\n"
        + table(header, results)
        + "\n\nOn real weights and data, the README's recipes (NYU-v2 depth, ADE20K segmentation, VOC07 discovery) run the same commands."
    )
    print(body)
    write_section("probes", "Probes and object discovery: plain vs SRT (bench_probes)", body)


if __name__ == "__main__":
    main()
