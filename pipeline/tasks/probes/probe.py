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

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.extraction.config import ConfigError, Flags, differences, option
from pipeline.tasks.shared.ground_truth import DENSE_SUFFIXES, TruthFiles, read_depth, read_labels
from pipeline.tasks.probes.heads import LinearHead, depth_from_outputs, head_input, sigloss, to_original
from pipeline.extraction.images import prepare
from pipeline.engine.models import load_store_model, seed_of, weights_id
from pipeline.tasks.probes.metrics import DepthScores, SegmentationScores, evaluated_labels
from pipeline.extraction.sources import read_bytes, read_uri
from pipeline.store.layout import FeatureStore
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
from pipeline.extraction.worker import build_engine

TASKS = ("depth", "segmentation")
NOT_IN_FINGERPRINT = ("train", "test", "names", "out", "storage_options", "overwrite", "num_workers", "log_every", "checkpoint_every", "output_ensemble", "pretrained", "weights")
# What must agree between a plain store and the SRT store whose views output ensembling borrows.
SAME_IMAGES = ("model", "weights", "norm", "image_size", "resize", "mean", "std", "dataset")


@dataclass
class ProbeConfig(Flags):
    train: tuple[str, ...] = field(default=(), metadata=option("training feature stores, comma-separated: one probe each", required=True, uri="input", parse="words"))
    test: tuple[str, ...] = field(default=(), metadata=option("test feature stores, comma-separated, one per --train store", required=True, uri="input", parse="words"))
    truth: str = field(default="", metadata=option("ground truth: a folder of depth PNG/.npy or label PNG files named like the images (by file stem; folders shared with the image's path break ties), or a list file of 'image truth' lines (NYU's nyu_train.txt)", required=True, uri="input"))
    out: str = field(default="", metadata=option("output folder URI: heads, checkpoints, scores (resumed if it holds checkpoints)", required=True, uri="output"))
    task: str = field(default="depth", metadata=option("what the probe predicts", choices=TASKS))
    names: tuple[str, ...] = field(default=(), metadata=option("a name per pair for the table and the folders (default: the training stores' folder names)", parse="words"))
    layers: tuple[int, ...] = field(default=(), metadata=option("stored blocks whose maps are concatenated (default: every stored block)", parse="ints"))
    cls: bool = field(default=False, metadata=option("concatenate each block's class token, broadcast over its map, as DINOv2's linear heads do"))
    bins: int = field(default=256, metadata=option("depth: uniform depth bins of DINOv2's classification head; 0 regresses depth directly"))
    depth_scale: float = field(default=1000.0, metadata=option("depth: PNG value per metre (NYU: millimetres, 1000); .npy files are in metres"))
    min_depth: float = field(default=1e-3, metadata=option("depth: smallest valid and predicted depth, metres"))
    max_depth: float = field(default=10.0, metadata=option("depth: largest valid and predicted depth, metres (NYU 10, KITTI 80)"))
    eigen_crop: bool = field(default=False, metadata=option("depth: score only rows 45:471 and columns 41:601 (NYU-v2's Eigen crop)"))
    num_classes: int = field(default=0, metadata=option("segmentation: number of classes (ADE20K: 150)"))
    ignore_index: int = field(default=255, metadata=option("segmentation: label value that is neither trained nor scored"))
    reduce_zero_label: bool = field(default=False, metadata=option("segmentation: label 0 is ignored and labels 1..N become 0..N-1 (ADE20K)"))
    steps: int = field(default=1000, metadata=option("optimizer steps per probe"))
    batch_size: int = field(default=8, metadata=option("images per step per worker"))
    lr: float = field(default=1e-3, metadata=option("AdamW learning rate, cosine-decayed to 0"))
    weight_decay: float = field(default=1e-4, metadata=option("AdamW weight decay"))
    checkpoint_every: int = field(default=200, metadata=option("steps between checkpoints (and one at the end)"))
    log_every: int = field(default=50, metadata=option("steps between progress lines"))
    num_workers: int = field(default=0, metadata=option("Ray Train workers; 0: one per GPU, or 1 without GPUs"))
    seed: int = field(default=0, metadata=option("seed of the head's initialization and the data order"))
    output_ensemble: bool = field(default=False, metadata=option("also score each plain pair's probe by output ensembling over the views of the SRT test store (needs the model: --pretrained or --weights for real weights)"))
    pretrained: bool = field(default=False, metadata=option("--output-ensemble: the stores were extracted with timm's pretrained weights"))
    weights: str | None = field(default=None, metadata=option("--output-ensemble: the stores' checkpoint URI", uri="input"))
    storage_options: dict[str, Any] = field(default_factory=dict, metadata=option("JSON of fsspec storage options; never stored", parse="json"))
    overwrite: bool = field(default=False, metadata=option("delete an existing run of a pair instead of resuming it"))

    def fingerprint(self, pair: int) -> dict[str, Any]:
        """What decides a pair's probe: a resumed run must match it."""
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_FINGERPRINT}
        return json.loads(json.dumps(kept | {"train_store": self.train[pair], "test_store": self.test[pair]}))  # as stored

    def name(self, pair: int) -> str:
        return self.names[pair] if self.names else PurePosixPath(self.train[pair].rstrip("/")).stem

    def folder(self, pair: int) -> str:
        return join(self.out, self.name(pair))


# ---------------------------------------------------------------------------- checks


def validate(config: ProbeConfig) -> None:
    """Check every flag before any work; errors name the flag."""
    f = config.flags
    for name in ("train", "test", "truth", "out"):
        if not getattr(config, name):
            raise ConfigError(f[name], "is required")
    if len(config.test) != len(config.train):
        raise ConfigError(f["test"], f"give one test store per --train store: {len(config.train)} training, {len(config.test)} test")
    if config.names and len(config.names) != len(config.train):
        raise ConfigError(f["names"], f"give one name per pair ({len(config.train)}), got {len(config.names)}")
    if len({config.name(i) for i in range(len(config.train))}) != len(config.train):
        raise ConfigError(f["names"], "two pairs have the same name (the training stores' folder names): give --names")
    if config.task not in TASKS:
        raise ConfigError(f["task"], f"must be one of {TASKS}, got {config.task!r}")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f[name], f"must be a positive integer, got {getattr(config, name)}")
    for name in ("bins", "num_workers", "weight_decay"):
        if getattr(config, name) < 0:
            raise ConfigError(f[name], f"must be 0 or more, got {getattr(config, name)}")
    for name in ("lr", "depth_scale"):
        if getattr(config, name) <= 0:
            raise ConfigError(f[name], f"must be positive, got {getattr(config, name)}")
    if config.bins == 1:
        raise ConfigError(f["bins"], "use 0 (regression) or at least 2 bins")
    if not 0 < config.min_depth < config.max_depth:
        raise ConfigError(f["max_depth"], f"need 0 < --min-depth < --max-depth, got {config.min_depth} and {config.max_depth}")
    if config.task == "segmentation" and config.num_classes < 2:
        raise ConfigError(f["num_classes"], f"segmentation needs the number of classes (at least 2), got {config.num_classes}")
    for pair in range(len(config.train)):
        train, test = (open_store(config, kind, pair) for kind in ("train", "test"))
        for store, kind in ((train, "train"), (test, "test")):
            try:
                chosen_layers(config, store)
            except (KeyError, ValueError) as error:
                raise ConfigError(f["layers"], f"{store.uri}: {error.args[0]}") from error
            for kind_needed, flag in (("dense", f[kind]), *((("cls", f["cls"]),) if config.cls else ())):
                try:
                    store.stored(kind_needed)
                except KeyError as error:
                    raise ConfigError(flag, error.args[0]) from error
            try:
                TruthFiles(config.truth, store, DENSE_SUFFIXES, config.storage_options)
            except (FileNotFoundError, OSError) as error:
                raise ConfigError(f["truth"], str(error)) from error
        if channels(config, train) != channels(config, test):
            raise ConfigError(f["test"], f"{test.uri} has {channels(config, test)} feature channels, its training store {channels(config, train)}")
    if config.output_ensemble:
        ensemble_plan(config)
    pairs = range(len(config.train))
    refused = [pair for pair in pairs if _differences(config, pair)]
    if refused and not config.overwrite:
        raise ConfigError(f["out"], f"{config.folder(refused[0])} holds a probe with another config; pass --overwrite or choose another --out. Differences: " + "; ".join(_differences(config, refused[0])))
    for pair in pairs:  # every flag checked: only now is anything written
        _start(config, pair)


def open_store(config: ProbeConfig, kind: str, pair: int) -> FeatureStore:
    uri = getattr(config, kind)[pair]
    try:
        return FeatureStore.open(uri, config.storage_options)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(config.flags[kind], str(error)) from error


def chosen_layers(config: ProbeConfig, store: FeatureStore) -> list[int]:
    return [store.layer_index(layer) for layer in config.layers] if config.layers else store.layers


def channels(config: ProbeConfig, store: FeatureStore) -> int:
    """Channels of the head's input: the blocks' maps, and their class tokens with --cls."""
    first = next(r for r in store.manifest.to_pylist() if r["status"] == "ok")
    width = store.dense_rows([first], chosen_layers(config, store)[0]).shape[1]
    return width * len(chosen_layers(config, store)) * (2 if config.cls else 1)


def _marker(config: ProbeConfig, pair: int) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(config.folder(pair), **config.storage_options)
    return fs, f"{path.rstrip('/')}/probe.json"


def _differences(config: ProbeConfig, pair: int) -> list[str]:
    fs, marker = _marker(config, pair)
    return differences(json.loads(fs.cat_file(marker)), config.fingerprint(pair)) if fs.exists(marker) else []


def _start(config: ProbeConfig, pair: int) -> None:
    """Clear the pair's folder with --overwrite; record the pair's fingerprint."""
    fs, marker = _marker(config, pair)
    folder = marker.rsplit("/", 1)[0]
    if config.overwrite and fs.exists(marker):
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(marker, json.dumps(config.fingerprint(pair), indent=2).encode())


def ensemble_plan(config: ProbeConfig) -> tuple[list[int], int]:
    """(plain pairs to ensemble, the pair whose test store's views they borrow); raises ConfigError."""
    flag = config.flags["output_ensemble"]
    stores = [open_store(config, "test", i) for i in range(len(config.test))]
    views = [len(s.config["shifts"]) for s in stores]
    plain = [i for i, n in enumerate(views) if n == 1]
    several = [i for i, n in enumerate(views) if n > 1]
    if not plain or not several:
        raise ConfigError(flag, "needs a plain pair (one view) and an SRT test store (several views) in the same command")
    source = stores[several[0]]
    for i in plain:
        store = stores[i]
        if len(chosen_layers(config, store)) != 1 or config.cls:
            raise ConfigError(flag, "ensembles a head on one block's map: give one --layers block and no --cls")
        if store.config["stride"] != open_store(config, "train", i).config["stride"]:
            raise ConfigError(flag, f"{store.uri} and its training store differ in stride")
        if diff := [k for k in SAME_IMAGES if store.config.get(k) != source.config.get(k)]:
            raise ConfigError(flag, f"{store.uri} and {source.uri} differ in {', '.join(diff)}: they must hold the same images through the same model")
        if chosen_layers(config, store)[0] not in source.layers:
            raise ConfigError(flag, f"{source.uri} does not store block {chosen_layers(config, store)[0]}")
    given = weights_id(source.config["model"], pretrained=config.pretrained, weights=config.weights, seed=seed_of(source.config["weights"]), storage_options=config.storage_options)
    if given != source.config["weights"]:
        raise ConfigError(config.flags["weights"], f"the stores were extracted with {source.config['weights']}; got {given} (pass the extraction's --pretrained or --weights)")
    return plain, several[0]


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
    return scores.result() | {"missing_truth": len(data.truth.missing)}


def write_scores(config: ProbeConfig, rows: dict[str, dict[str, Any]]) -> None:
    for pair in range(len(config.train)):
        if (name := config.name(pair)) in rows:
            write_bytes(join(config.folder(pair), "scores.json"), json.dumps(rows[name], indent=2).encode(), config.storage_options)
    write_bytes(join(config.out, "scores.json"), json.dumps(rows, indent=2).encode(), config.storage_options)
