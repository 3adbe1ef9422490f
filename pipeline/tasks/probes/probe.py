"""Linear probes on feature stores: monocular depth and semantic segmentation, trained and scored.

One probe per (training store, test store) pair, so plain, SRT and preset stores compare side by
side in one command. Training streams the training store in batches of one size bucket (never the
whole store in memory) against ground truth on the original pixels (pipeline.tasks.shared.ground_truth), on CPU,
one GPU, or several Ray Train workers, with checkpoints and resume. Scores follow the benchmarks'
code (pipeline.tasks.probes.metrics). With --output-ensemble the probe of a plain pair is also scored by
output-space ensembling over the views of the command's SRT test store: the paper's baseline.

Layout under --out (any fsspec URI):

    scores.json                              every row of the printed table
    <name>/probe.json                        the pair's fingerprint: a resumed run must match it
    <name>/checkpoints/step-NNNNNNN/...      head, optimizer and schedule; state.json written last
    <name>/head.pt, <name>/scores.json       the final head and its scores on the test store
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.extraction.images import prepare
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.weights import load_store_model
from pipeline.extraction.worker import build_engine
from pipeline.store.reader import FeatureStore
from pipeline.store.uris import read_uri
from pipeline.tasks.probes.config import ProbeConfig, channels, chosen_layers
from pipeline.tasks.probes.heads import LinearHead, depth_from_outputs, head_input, sigloss, to_original
from pipeline.tasks.probes.metrics import DepthScores, SegmentationScores, evaluated_labels
from pipeline.tasks.shared.ground_truth import DENSE_SUFFIXES, TruthFiles, read_depth, read_labels
from pipeline.tasks.shared.training import (
    Report,
    batches,
    by_bucket,
    checkpoint_file,
    join,
    latest_checkpoint,
    save_checkpoint,
    write_bytes,
)

log = logging.getLogger("srt")

# ---------------------------------------------------------------------------- data


class Task:
    """What the depth and segmentation probes differ in: outputs, the loss, the scores."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.depth = config.task == "depth"
        self.outputs = (config.bins or 1) if self.depth else config.num_classes

    def truth(self, uri: str) -> np.ndarray:
        c = self.config
        return read_depth(uri, c.depth_scale, c.storage_options) if self.depth else read_labels(uri, c.storage_options)

    def maps(self, outputs: torch.Tensor) -> torch.Tensor:
        """Head outputs -> what is resized onto the pixels: depth [B, 1, h, w] or class logits."""
        return depth_from_outputs(outputs, self.config.min_depth, self.config.max_depth) if self.depth else outputs

    def loss(self, maps: list[torch.Tensor], truths: list[np.ndarray], coverage: list[torch.Tensor]) -> torch.Tensor:
        """The batch's loss over every trained pixel of its images, on the original pixel grids."""
        c = self.config
        predicted, wanted = [], []
        for values, truth, covered in zip(maps, truths, coverage):
            target = torch.from_numpy(truth if self.depth else evaluated_labels(truth, c.reduce_zero_label)).to(values.device)
            if self.depth:
                keep = covered & (target > c.min_depth) & (target < c.max_depth)
                predicted.append(values[0][keep])
            else:
                keep = covered & (target != c.ignore_index) & (target >= 0) & (target < c.num_classes)
                predicted.append(values[:, keep].T)
            wanted.append(target[keep])
        if self.depth:
            return sigloss(torch.cat(predicted), torch.cat(wanted))
        return F.cross_entropy(torch.cat(predicted), torch.cat(wanted).long())

    def scores(self) -> DepthScores | SegmentationScores:
        c = self.config
        if self.depth:
            return DepthScores(c.min_depth, c.max_depth, c.eigen_crop)
        return SegmentationScores(c.num_classes, c.ignore_index, c.reduce_zero_label)

    def prediction(self, values: torch.Tensor) -> np.ndarray:
        """A map on the original pixels -> depth in metres, or class indices."""
        return values[0].cpu().numpy() if self.depth else values.argmax(0).cpu().numpy()


class ProbeData:
    """Head inputs and ground truth of a store's images that have ground truth."""

    def __init__(self, config: ProbeConfig, store: FeatureStore, task: Task) -> None:
        self.config, self.store, self.task = config, store, task
        self.layers = chosen_layers(config, store)
        self.truth = TruthFiles(config.truth, store, DENSE_SUFFIXES, config.storage_options)
        self.rows = [r for r in store.manifest.to_pylist() if r["image_id"] in self.truth.files]

    def features(self, records: list[dict[str, Any]]) -> torch.Tensor:
        dense = [torch.from_numpy(self.store.dense_rows(records, layer).astype(np.float32)) for layer in self.layers]
        cls = [torch.from_numpy(self.store.vector_rows("cls", records, layer).astype(np.float32)) for layer in self.layers] if self.config.cls else None
        return head_input(dense, cls)

    def truths(self, records: list[dict[str, Any]]) -> list[np.ndarray]:
        return [self.task.truth(self.truth.files[r["image_id"]]) for r in records]


def on_pixels(maps: torch.Tensor, records: list[dict[str, Any]], truths: list[np.ndarray]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Maps over the model input [B, K, h, w] resized onto each image's ground-truth grid, and
    the pixels each covers."""
    for record, truth in zip(records, truths):
        if (truth.shape[0], truth.shape[1]) != (record["height"], record["width"]):
            raise ValueError(f"the ground truth of {record['uri']} is {truth.shape[1]}x{truth.shape[0]} pixels, the image {record['width']}x{record['height']}")
    placed = [to_original(m, height=t.shape[0], width=t.shape[1], region=tuple(r["region"])) for m, r, t in zip(maps, records, truths)]
    return [p[0] for p in placed], [p[1] for p in placed]


# ---------------------------------------------------------------------------- training


def make_head(config: ProbeConfig, store: FeatureStore, task: Task) -> LinearHead:
    torch.manual_seed(config.seed)
    return LinearHead(channels(config, store), task.outputs)


def head_bytes(head: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, buffer)
    return buffer.getvalue()


def train_probe(config: ProbeConfig, *, pair: int, rank: int = 0, world: int = 1, device: str | torch.device = "cpu", report: Report = print) -> dict[str, Any]:
    """Train pair `pair`'s head on this worker's share of its training images; rank 0 checkpoints
    and writes head.pt. With world > 1 the process group must exist (Ray Train makes it)."""
    device = torch.device(device)
    options, folder = config.storage_options, config.folder(pair)
    task = Task(config)
    store = FeatureStore.open(config.train[pair], options)
    data = ProbeData(config, store, task)
    head = make_head(config, store, task).to(device)
    model: nn.Module = head
    if world > 1:
        model = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    state: dict[str, Any] = {"step": 0, "loss": None}
    if found := latest_checkpoint(folder, options):
        checkpoint, state = found
        saved = torch.load(io.BytesIO(checkpoint_file(checkpoint, "training.pt", options)), weights_only=True)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        report({"event": "resumed", "probe": config.name(pair), "step": state["step"], "from": checkpoint})
    stream = batches(data.rows[rank::world], config.batch_size, seed=config.seed * 1000 + rank)
    for _ in range(state["step"]):  # replay the data order up to the checkpoint
        next(stream)
    model.train()
    started, seen = time.perf_counter(), 0
    for step in range(state["step"] + 1, config.steps + 1):
        records = next(stream)
        truths = data.truths(records)
        maps, coverage = on_pixels(task.maps(model(data.features(records).to(device))), records, truths)
        loss = task.loss(maps, truths, coverage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        seen += len(records)
        state = {"step": step, "loss": loss.item()}
        if step % config.log_every == 0 or step == config.steps:
            report({"probe": config.name(pair), "step": step, "loss": state["loss"], "lr": schedule.get_last_lr()[0], "images_per_s": seen * world / (time.perf_counter() - started)})
        if step % config.checkpoint_every == 0 or step == config.steps:
            if rank == 0:
                buffer = io.BytesIO()
                torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, buffer)
                save_checkpoint(folder, state, {"training.pt": buffer.getvalue()}, options)
            if world > 1:
                torch.distributed.barrier()  # no worker runs ahead of a checkpoint it might resume from
    if rank == 0:
        write_bytes(join(folder, "head.pt"), head_bytes(head), options)
    return state


def load_head(config: ProbeConfig, pair: int, device: torch.device) -> LinearHead:
    task = Task(config)
    head = make_head(config, FeatureStore.open(config.train[pair], config.storage_options), task)
    head.load_state_dict(torch.load(io.BytesIO(read_uri(join(config.folder(pair), "head.pt"), config.storage_options)), weights_only=True))
    return head.to(device).eval()


# ---------------------------------------------------------------------------- scoring


@torch.no_grad()
def evaluate(config: ProbeConfig, pair: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Scores of pair `pair`'s trained head on its test store."""
    device = torch.device(device)
    task = Task(config)
    data = ProbeData(config, FeatureStore.open(config.test[pair], config.storage_options), task)
    head, scores = load_head(config, pair, device), task.scores()
    for records in by_bucket(data.rows, config.batch_size):
        truths = data.truths(records)
        maps, coverage = on_pixels(task.maps(head(data.features(records).to(device))), records, truths)
        for values, truth, covered in zip(maps, truths, coverage):
            scores.add(task.prediction(values), truth, covered.cpu().numpy())
    return scored(config, scores, data)


def scored(config: ProbeConfig, scores: DepthScores | SegmentationScores, data: ProbeData) -> dict[str, Any]:
    """The scores of a test store, saying what the metric left out: labels beyond --num-classes."""
    if isinstance(scores, SegmentationScores) and scores.beyond_pixels:
        log.warning(
            "%s: %d pixels of %d images have labels up to %d, beyond --num-classes %d: left out of the scores and "
            "of training (as mmseg does); give --num-classes %d to count them",
            data.store.uri, scores.beyond_pixels, scores.beyond_images, scores.largest_label, config.num_classes, scores.largest_label + 1,
        )
    return scores.result() | {"missing_truth": len(data.truth.missing)}


@torch.no_grad()
def evaluate_output_ensemble(config: ProbeConfig, pair: int, source_pair: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Scores of plain pair `pair`'s head applied to every view of `source_pair`'s test store
    (its shifts, stride and boundary) and averaged in output space, on that store's images."""
    device = torch.device(device)
    task = Task(config)
    source = FeatureStore.open(config.test[source_pair], config.storage_options)
    layer = chosen_layers(config, FeatureStore.open(config.test[pair], config.storage_options))[0]
    vit = load_store_model(source.config["model"], source.config["weights"], pretrained=config.pretrained, weights=config.weights, storage_options=config.storage_options, device=device)
    engine, policy = build_engine(vit, source.config | {"layers": [layer], "keys": []}, batch_size=64)
    head = load_head(config, pair, device)
    data, plan, scores = ProbeData(config, source, task), source.plan(), task.scores()

    def ensembled_head(grid: torch.Tensor) -> torch.Tensor:
        maps = task.maps(head(grid))
        return maps if task.depth else maps.softmax(1)

    for records in by_bucket(data.rows, config.batch_size):
        inputs = []
        for record, blob in zip(records, read_bytes([plan[r["image_id"]] for r in records], config.storage_options)):
            if isinstance(blob, Exception):
                raise RuntimeError(f"cannot read {record['uri']} (image_id {record['image_id']}) again: {blob}")
            inputs.append(prepare(blob, policy))
        valid = torch.stack([i.valid for i in inputs]) if inputs[0].valid is not None else None
        truths = data.truths(records)
        ensembled = engine.output_ensemble(torch.stack([i.tensor for i in inputs]), ensembled_head, layer=layer, valid=valid)
        maps, coverage = on_pixels(ensembled.float(), records, truths)
        for values, truth, covered in zip(maps, truths, coverage):
            scores.add(task.prediction(values), truth, covered.cpu().numpy())
    return scored(config, scores, data)


def write_scores(config: ProbeConfig, rows: dict[str, dict[str, Any]]) -> None:
    for pair in range(len(config.train)):
        if (name := config.name(pair)) in rows:
            write_bytes(join(config.folder(pair), "scores.json"), json.dumps(rows[name], indent=2).encode(), config.storage_options)
    write_bytes(join(config.out, "scores.json"), json.dumps(rows, indent=2).encode(), config.storage_options)
