"""The probe job's config and every check made before training: pairs of stores that may be
compared (same images, same model where output ensembling borrows views), resumable outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec

from pipeline.engine.models import seed_of
from pipeline.extraction.flags import ConfigError, Flags, option
from pipeline.extraction.weights import weights_id
from pipeline.store.layout import differences, feature_differences
from pipeline.store.reader import FeatureStore
from pipeline.tasks.shared.ground_truth import DENSE_SUFFIXES, TruthFiles
from pipeline.tasks.shared.training import join

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
    weights: str | None = field(default=None, metadata=option("--output-ensemble: the stores' checkpoint URI", uri="hashed"))
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
        blocks = [{"layers": chosen_layers(config, store)} for store in (train, test)]
        if diff := feature_differences(train.config, test.config, ("train", "test")) + differences(*blocks, ("train", "test")):
            raise ConfigError(f["test"], f"{test.uri} holds other features than its training store {train.uri}, so the probe's scores would mean nothing: " + "; ".join(diff))
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
