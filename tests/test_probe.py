"""Linear probes and object discovery on stores written by the real extraction job, over synthetic
scenes with exact depth, masks and boxes (bench.quality)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from bench.bench_probes import write_scene_dataset
from pipeline.commands.discover import main as discover_main
from pipeline.commands.probe import main as probe_main
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.runner import run_local
from pipeline.tasks.discovery import box_iou
from pipeline.tasks.probes.config import ProbeConfig, validate
from pipeline.tasks.probes.metrics import DepthScores, SegmentationScores
from pipeline.tasks.probes.probe import evaluate, train_probe
from pipeline.tasks.shared.training import latest_checkpoint

MODEL = "vit_tiny_patch16_224"
SIZE = 64
SPLITS = {"train": 16, "test": 6}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Plain (one view, stride 16) and SRT (grid of 9 views, stride 8) stores of both splits."""
    root = tmp_path_factory.mktemp("probe")
    stores = {}
    for split, count in SPLITS.items():
        write_scene_dataset(root, split, count, SIZE)
        for kind, flags in {"plain": {"shifts": ((0, 0),), "stride": 16}, "srt": {"radius": 1, "stride": 8}}.items():
            out = str(root / f"{kind}_{split}.zarr")
            run_local(ExtractConfig(dataset=str(root / "images" / split), out=out, model=MODEL, image_size=SIZE, layers=(5, 11), keys=(11,), resize="aspect", **flags))
            stores[kind, split] = out
    return root, stores


def config(scenes, out, kind: str = "srt", **overrides) -> ProbeConfig:
    root, stores = scenes
    base = dict(train=(stores[kind, "train"],), test=(stores[kind, "test"],), truth=str(root / "depth"), out=str(out), task="depth", steps=60, batch_size=4, lr=1e-2, log_every=20, checkpoint_every=30, max_depth=5.0)
    return ProbeConfig(**{**base, **overrides})


def train_and_score(cfg: ProbeConfig) -> dict:
    validate(cfg)
    train_probe(cfg, pair=0, report=lambda _: None)
    return evaluate(cfg, 0)


def baseline(scenes, task: str) -> dict:
    """The best constant prediction's scores: the mean training depth, or the majority class."""
    root, _ = scenes
    folder = "depth" if task == "depth" else "labels"
    train = [np.asarray(Image.open(p)) for p in sorted((root / folder / "train").glob("*.png"))]
    test = [np.asarray(Image.open(p)) for p in sorted((root / folder / "test").glob("*.png"))]
    if task == "depth":
        scores, value = DepthScores(1e-3, 5.0, eigen_crop=False), np.mean(train) / 1000
        for truth in test:
            scores.add(np.full(truth.shape, value), truth.astype(np.float32) / 1000)
    else:
        scores, value = SegmentationScores(2, reduce_zero_label=True), 0  # the background
        for truth in test:
            scores.add(np.full(truth.shape, value), truth)
    return scores.result()


def test_a_depth_probe_learns_from_stored_maps_of_two_blocks_and_class_tokens(scenes, tmp_path):
    result = train_and_score(config(scenes, tmp_path / "p", cls=True))
    constant = baseline(scenes, "depth")
    # Measured: RMSE 0.40 and delta1 0.75 against 0.53 and 0.25 for the mean depth.
    assert result["rmse"] < 0.85 * constant["rmse"] and result["a1"] > constant["a1"] + 0.2
    assert result["images"] == SPLITS["test"]


def test_a_segmentation_probe_beats_the_majority_class(scenes, tmp_path):
    root, _ = scenes
    cfg = config(scenes, tmp_path / "p", task="segmentation", truth=str(root / "labels"), num_classes=2, reduce_zero_label=True, layers=(11,))
    result = train_and_score(cfg)
    # Measured: mIoU 0.63 against 0.43 for predicting background everywhere.
    assert result["mIoU"] > baseline(scenes, "segmentation")["mIoU"] + 0.1


def test_labels_beyond_the_classes_are_left_out_and_counted(scenes, tmp_path, caplog):
    """As mmseg: labels at or above --num-classes count nowhere; the probe says how many there were."""
    root, _ = scenes
    labels = tmp_path / "labels"
    shutil.copytree(root / "labels", labels)
    marked = sorted((labels / "test").glob("*.png"))[:2]
    for path in marked:
        truth = np.asarray(Image.open(path)).copy()
        truth[:3, :5] = 7  # 6 once zero is reduced: beyond 2 classes
        Image.fromarray(truth).save(path)
    cfg = config(scenes, tmp_path / "p", task="segmentation", truth=str(labels), num_classes=2, reduce_zero_label=True, layers=(11,), steps=4)
    with caplog.at_level("WARNING", logger="srt"):
        result = train_and_score(cfg)
    assert np.isfinite(result["mIoU"]) and result["images"] == SPLITS["test"]
    assert f"30 pixels of {len(marked)} images have labels up to 6, beyond --num-classes 2" in caplog.text


def test_a_test_store_with_other_features_than_its_training_store_is_refused(scenes, tmp_path):
    """Same channel count, other features: other shifts and stride, or other weights."""
    root, stores = scenes
    with pytest.raises(ConfigError, match=r"^--test: .* holds other features than its training store .*shifts: train \[\[0, 0\]\], test "):
        validate(config(scenes, tmp_path / "p", kind="plain", test=(stores["srt", "test"],)))
    reseeded = str(tmp_path / "seed1.zarr")
    run_local(ExtractConfig(dataset=str(root / "images" / "test"), out=reseeded, model=MODEL, image_size=SIZE, layers=(5, 11), resize="aspect", radius=1, stride=8, seed=1))
    with pytest.raises(ConfigError, match=r"weights: train 'random:seed=0', test 'random:seed=1'"):
        validate(config(scenes, tmp_path / "p", test=(reseeded,)))
    assert not (tmp_path / "p").exists()


def test_resume_continues_from_the_last_checkpoint_and_reaches_the_same_head(scenes, tmp_path):
    whole = config(scenes, tmp_path / "whole", steps=40, checkpoint_every=20)
    validate(whole)
    train_probe(whole, pair=0, report=lambda _: None)
    cut = config(scenes, tmp_path / "cut", steps=40, checkpoint_every=20)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    folder = tmp_path / "cut" / "srt_train"
    shutil.rmtree(folder / "checkpoints" / "step-0000040")  # as if stopped after step 20's checkpoint
    (folder / "head.pt").unlink()
    reports: list[dict] = []
    train_probe(cut, pair=0, report=reports.append)
    assert reports[0] == {"event": "resumed", "probe": "srt_train", "step": 20, "from": str(folder / "checkpoints" / "step-0000020")}
    assert [r["step"] for r in reports[1:]] == [40]
    heads = [torch.load(f / "srt_train" / "head.pt", weights_only=True) for f in (tmp_path / "whole", tmp_path / "cut")]
    assert all(torch.allclose(heads[0][k].float(), heads[1][k].float(), atol=1e-6) for k in heads[0])
    assert latest_checkpoint(str(folder), {})[1]["step"] == 40


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"test": ()}, "--test"),
        ({"task": "segmentation"}, "--num-classes"),
        ({"layers": (3,)}, "--layers"),
        ({"truth": "EMPTY"}, "--truth"),
        ({"min_depth": 20.0}, "--max-depth"),
        ({"output_ensemble": True}, "--output-ensemble"),
        ({"names": ("a", "b")}, "--names"),
    ],
)
def test_bad_flags_fail_before_any_work_naming_the_flag(scenes, tmp_path, overrides, flag):
    if overrides.get("truth") == "EMPTY":
        (tmp_path / "empty").mkdir()
        overrides = {"truth": str(tmp_path / "empty")}
    with pytest.raises(ConfigError) as error:
        validate(config(scenes, tmp_path / "p", **overrides))
    assert str(error.value).startswith(flag)
    assert not (tmp_path / "p").exists()  # nothing written


def test_another_config_in_the_same_out_is_refused_unless_overwritten(scenes, tmp_path):
    validate(config(scenes, tmp_path / "p"))
    with pytest.raises(ConfigError, match=r"^--out: .* Differences: lr: stored 0.01, requested 0.1"):
        validate(config(scenes, tmp_path / "p", lr=0.1))
    validate(config(scenes, tmp_path / "p", lr=0.1, overwrite=True))
    assert json.loads((tmp_path / "p" / "srt_train" / "probe.json").read_text())["lr"] == 0.1


def test_side_by_side_with_output_ensembling_on_ray_train_and_a_list_file(scenes, tmp_path, capsys):
    """Plain and SRT pairs in one command, two Ray Train workers, ground truth paired by a list
    file (NYU's layout: names that differ from the images'), and the plain probe ensembled over
    the SRT store's 9 views."""
    root, stores = scenes
    lines = [f"images/{split}/scene{i}.png depth/{split}/scene{i}.png 518.8" for split, n in SPLITS.items() for i in range(n)]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "probes"
    argv = [
        "--train", f"{stores['plain', 'train']},{stores['srt', 'train']}", "--test", f"{stores['plain', 'test']},{stores['srt', 'test']}",
        "--names", "plain,srt", "--truth", str(root / "pairs.txt"), "--out", str(out), "--layers", "11", "--steps", "24",
        "--batch-size", "4", "--lr", "0.01", "--max-depth", "5", "--num-workers", "2", "--output-ensemble",
    ]  # fmt: skip
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert probe_main(argv) == 0
        printed = capsys.readouterr().out
        # a rerun only scores the finished probes again, to the same figures
        first = (out / "scores.json").read_text()
        assert probe_main(argv) == 0
    finally:
        ray.shutdown()
    rows = json.loads((out / "scores.json").read_text())
    assert json.loads(first) == rows
    assert list(rows) == ["plain", "srt", "plain + output ensemble"]
    assert all(row["images"] == SPLITS["test"] and np.isfinite(row["rmse"]) for row in rows.values())
    assert rows["plain + output ensemble"]["rmse"] != rows["plain"]["rmse"]
    assert all(name in printed for name in rows) and "RMSE-log" in printed
    assert (out / "srt" / "head.pt").exists() and json.loads((out / "srt" / "scores.json").read_text()) == rows["srt"]


def test_discovery_boxes_and_corloc_from_a_store(scenes, tmp_path, capsys):
    root, stores = scenes
    truth = list(csv.reader(open(root / "boxes_test.csv")))
    out = tmp_path / "found"
    assert discover_main(["--store", stores["srt", "test"], "--boxes", str(root / "boxes_test.csv"), "--method", "lost,tokencut", "--out", str(out)]) == 0
    boxes = list(csv.DictReader(open(out / "boxes.csv")))
    scores = json.loads((out / "scores.json").read_text())
    assert len(boxes) == 2 * SPLITS["test"] and set(scores) == {"lost", "tokencut"}
    expected = {r[0].removesuffix(".png"): np.array([r[1:]], float) for r in truth[1:]}
    for method in ("lost", "tokencut"):
        found = [b for b in boxes if b["method"] == method]
        assert all(0 <= float(b["x0"]) < float(b["x1"]) <= SIZE and 0 <= float(b["y0"]) < float(b["y1"]) <= SIZE for b in found)
        hits = sum(box_iou(np.array([float(b[k]) for k in ("x0", "y0", "x1", "y1")]), expected[b["image"]])[0] >= 0.5 for b in found)
        assert scores[method] == {"CorLoc": hits / SPLITS["test"], "localized": hits, "images": SPLITS["test"]}
    assert "CorLoc      lost" in capsys.readouterr().out


def test_ground_truth_and_outputs_on_s3(scenes, s3_server, tmp_path):
    """The truth folder and --out are S3 URIs (moto's server), the stores local: the same probe
    as with local paths, to the same scores."""
    import fsspec

    root, _ = scenes
    fs = fsspec.filesystem("s3", **s3_server)
    fs.put(str(root / "depth"), "bucket/depth", recursive=True)
    local = config(scenes, tmp_path / "local", steps=8)
    remote = config(scenes, "s3://bucket/probes", truth="s3://bucket/depth", steps=8, storage_options=s3_server)
    assert train_and_score(remote) == train_and_score(local)
    assert fs.exists("bucket/probes/srt_train/head.pt") and fs.exists("bucket/probes/srt_train/checkpoints/step-0000008/state.json")
