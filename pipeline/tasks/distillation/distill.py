"""Self-distillation: fine-tune a copy of a ViT so that one plain pass approaches its SRT features.

Targets are a feature store's SRT maps of one block, average-pooled to token stride. The student
starts as the store's own model; its plain tap at that block is pulled toward the targets (MSE
or L1) with a small L2 penalty on the trained parameters, by AdamW. `train_worker` is the loop
each Ray Train worker runs (or the only process, with --local); it needs no Ray.

Layout under --out (any fsspec URI):

    distill.json                                the run's fingerprint: a resumed run must match it
    checkpoints/step-NNNNNNN/model.safetensors  the student, loadable by extraction's --weights
    checkpoints/step-NNNNNNN/training.pt        optimizer and schedule state
    checkpoints/step-NNNNNNN/state.json         written last: the checkpoint is complete
    model.safetensors, model.json               the final student and its sidecar
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.models import Tap, ViT, seed_of
from pipeline.extraction.flags import ConfigError, Flags, option
from pipeline.extraction.images import prepare
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.weights import load_store_model, weights_id
from pipeline.extraction.worker import build_engine
from pipeline.store.layout import differences
from pipeline.store.reader import FeatureStore
from pipeline.store.uris import read_uri
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

LOSSES = ("mse", "l1")
SCHEDULES = ("step", "cosine")
TRAINABLE = ("all", "biases", "last-blocks")
NOT_IN_FINGERPRINT = ("storage_options", "overwrite", "num_workers", "log_every", "checkpoint_every")


@dataclass
class DistillConfig(Flags):
    store: str = field(default="", metadata=option("teacher feature store URI (extracted with SRT)", required=True, uri="input"))
    out: str = field(default="", metadata=option("output folder URI: checkpoints, final model, sidecar (resumed if it holds checkpoints)", required=True, uri="output"))
    pretrained: bool = field(default=False, metadata=option("the store was extracted with timm's pretrained weights"))
    weights: str | None = field(default=None, metadata=option("the store's checkpoint URI (the teacher's weights)", uri="hashed"))
    layer: int | None = field(default=None, metadata=option("stored block to distill (default: the store's only one)"))
    loss: str = field(default="mse", metadata=option("distance between student tokens and pooled SRT targets", choices=LOSSES))
    l2: float = field(default=1e-6, metadata=option("L2 penalty on the trained parameters (times their sum of squares)"))
    lr: float = field(default=3e-4, metadata=option("AdamW learning rate"))
    schedule: str = field(default="step", metadata=option("learning-rate schedule after the warmup", choices=SCHEDULES))
    warmup: int = field(default=10, metadata=option("steps of linear learning-rate warmup (Adam's first steps are large without it)"))
    step_size: int = field(default=0, metadata=option("step schedule: steps between decays (0: a third of --steps)"))
    gamma: float = field(default=0.1, metadata=option("step schedule: decay factor"))
    steps: int = field(default=300, metadata=option("optimizer steps"))
    batch_size: int = field(default=8, metadata=option("images per step per worker"))
    trainable: str = field(default="all", metadata=option("parameters that train: all, biases only, or the last --last-blocks blocks", choices=TRAINABLE))
    last_blocks: int = field(default=2, metadata=option("blocks that train with --trainable last-blocks (ending at --layer)"))
    holdout: float = field(default=0.1, metadata=option("fraction of the store's images held out to evaluate the student"))
    checkpoint_every: int = field(default=100, metadata=option("steps between checkpoints (and one at the end)"))
    log_every: int = field(default=10, metadata=option("steps between progress lines"))
    num_workers: int = field(default=0, metadata=option("Ray Train workers; 0: one per GPU, or 1 without GPUs"))
    seed: int = field(default=0, metadata=option("seed of the data order"))
    storage_options: dict[str, Any] = field(default_factory=dict, metadata=option("JSON of fsspec storage options; never stored", parse="json"))
    overwrite: bool = field(default=False, metadata=option("delete an existing --out instead of resuming it"))

    def fingerprint(self) -> dict[str, Any]:
        """What decides the result: a resumed run must match it."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_FINGERPRINT}


def validate(config: DistillConfig) -> FeatureStore:
    """Check every flag before any work (errors name the flag); returns the opened teacher store."""
    f = config.flags
    for name in ("store", "out"):
        if not getattr(config, name):
            raise ConfigError(f[name], "is required")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "last_blocks"):
        if getattr(config, name) < 1:
            raise ConfigError(f[name], f"must be a positive integer, got {getattr(config, name)}")
    for name in ("step_size", "num_workers", "warmup"):
        if getattr(config, name) < 0:
            raise ConfigError(f[name], f"must be 0 or more, got {getattr(config, name)}")
    for name in ("lr", "gamma"):
        if getattr(config, name) <= 0:
            raise ConfigError(f[name], f"must be positive, got {getattr(config, name)}")
    if config.l2 < 0:
        raise ConfigError(f["l2"], f"must be 0 or more, got {config.l2}")
    if not 0 <= config.holdout < 1:
        raise ConfigError(f["holdout"], f"must be in [0, 1), got {config.holdout}")
    for name, allowed in (("loss", LOSSES), ("schedule", SCHEDULES), ("trainable", TRAINABLE)):
        if getattr(config, name) not in allowed:
            raise ConfigError(f[name], f"must be one of {allowed}, got {getattr(config, name)!r}")
    try:
        store = FeatureStore.open(config.store, config.storage_options)
    except FileNotFoundError as error:
        raise ConfigError(f["store"], str(error)) from error
    try:
        layer = store.layer_index(config.layer)
    except (KeyError, ValueError) as error:
        raise ConfigError(f["layer"], str(error.args[0])) from error
    if config.trainable == "last-blocks" and config.last_blocks > layer + 1:
        raise ConfigError(f["last_blocks"], f"block {layer} has only {layer + 1} blocks up to it")
    teacher = store.config
    if len(teacher["shifts"]) < 2:
        raise ConfigError(f["store"], f"{config.store} holds plain features (one view): the student would learn its own model's features again; distil from a store extracted with SRT's shifts")
    try:
        given = weights_id(teacher["model"], pretrained=config.pretrained, weights=config.weights, seed=seed_of(teacher["weights"]), storage_options=config.storage_options)
    except (OSError, ValueError) as error:
        raise ConfigError(f["weights"], f"cannot read {config.weights}: {error}") from error
    if given != teacher["weights"]:
        raise ConfigError(f["weights"], f"the student starts from the store's weights {teacher['weights']}; got {given} (pass the extraction's --pretrained or --weights)")
    train, held = split_rows(store, config.holdout)
    if not train:
        raise ConfigError(f["holdout"], f"no images left to train on ({len(held)} held out of {len(held)})")
    _check_out(config)
    return store


def _check_out(config: DistillConfig) -> None:
    fs, path = fsspec.core.url_to_fs(config.out, **config.storage_options)
    marker = f"{path.rstrip('/')}/distill.json"
    if fs.exists(marker):
        if config.overwrite:
            fs.rm(path, recursive=True)
        elif diff := differences(json.loads(fs.cat_file(marker)), config.fingerprint()):
            raise ConfigError(config.flags["out"], f"{config.out} holds a run with another config; pass --overwrite or choose another --out. Differences: " + "; ".join(diff))
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(marker, json.dumps(config.fingerprint(), indent=2).encode())


# ---------------------------------------------------------------------------- data


def split_rows(store: FeatureStore, holdout: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) manifest rows of ok images: the held-out ones are the ceil(holdout * n)
    with the smallest hash of their image_id, so the split depends on nothing but the ids."""
    ok = [r for r in store.manifest.to_pylist() if r["status"] == "ok"]
    ranked = sorted(ok, key=lambda r: hashlib.sha1(r["image_id"].encode()).hexdigest())
    count = math.ceil(holdout * len(ok))
    held = {r["image_id"] for r in ranked[:count]}
    return [r for r in ok if r["image_id"] not in held], [r for r in ok if r["image_id"] in held]


class TargetLoader:
    """Model inputs (the store's own image policy) and pooled SRT targets of manifest rows."""

    def __init__(self, store: FeatureStore, vit: ViT, layer: int) -> None:
        self.store, self.layer, self.plan = store, layer, store.plan()
        _, self.policy = build_engine(vit, store.config, batch_size=1)
        self.pool = vit.patch_size // store.config["stride"]

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for row, blob in zip(rows, read_bytes([self.plan[r["image_id"]] for r in rows], self.store.storage_options)):
            if isinstance(blob, Exception):
                raise RuntimeError(f"cannot read {row['uri']} (image_id {row['image_id']}) again: {blob}")
            images.append(prepare(blob, self.policy).tensor)
        targets = [torch.from_numpy(self.store.dense(r["image_id"], self.layer).astype(np.float32)) for r in rows]
        return torch.stack(images), F.avg_pool2d(torch.stack(targets), self.pool)


# ---------------------------------------------------------------------------- model


class PlainTap(nn.Module):
    """The student's plain feature map [B, C, H/p, W/p] at one block: an nn.Module, so DDP can wrap it."""

    def __init__(self, vit: ViT, layer: int, norm: bool) -> None:
        super().__init__()
        self.model = vit.model  # registers the parameters
        self.vit, self.tap, self.norm = vit, Tap("block", layer), norm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_taps(images, [self.tap], norm=self.norm)[self.tap].grid


def trainable_parameters(vit: ViT, layer: int, norm: bool, trainable: str, last_blocks: int) -> list[nn.Parameter]:
    """The parameters that train; the rest are frozen. Only what the tap's forward pass uses can
    train (blocks after the tap and the head never see a gradient)."""
    model = vit.model
    tokens = [p for p in (getattr(model, "cls_token", None), getattr(model, "reg_token", None), getattr(model, "pos_embed", None)) if p is not None]
    tail = [model.norm] if norm else []
    used = [model.patch_embed, model.norm_pre, *model.blocks[: layer + 1], *tail]
    if trainable == "all":
        chosen = tokens + [p for m in used for p in m.parameters()]
    elif trainable == "biases":
        chosen = [p for m in used for name, p in m.named_parameters() if name.endswith("bias")]
    else:
        chosen = [p for m in [*model.blocks[layer + 1 - last_blocks : layer + 1], *tail] for p in m.parameters()]
    chosen_ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen_ids)
    return chosen


@torch.no_grad()
def holdout_distance(student: nn.Module, loader: TargetLoader, rows: list[dict[str, Any]], device: torch.device, batch_size: int) -> float | None:
    """Mean squared distance of plain features to the pooled SRT targets over held-out images."""
    if not rows:
        return None
    total, count = 0.0, 0
    for batch in by_bucket(rows, batch_size):
        images, targets = loader(batch)
        total += F.mse_loss(student(images.to(device)), targets.to(device), reduction="sum").item()
        count += targets.numel()
    return total / count


# ---------------------------------------------------------------------------- checkpoints


def model_bytes(vit: ViT) -> bytes:
    """The student's timm state dict as safetensors: what `load_vit(weights=...)` reads."""
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in vit.model.state_dict().items()})


def save_model_checkpoint(out: str, state: dict[str, Any], vit: ViT, optimizer: torch.optim.Optimizer, schedule: Any, storage_options: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, buffer)
    return save_checkpoint(out, state, {"model.safetensors": model_bytes(vit), "training.pt": buffer.getvalue()}, storage_options)


def restore_checkpoint(folder: str, vit: ViT, optimizer: torch.optim.Optimizer, schedule: Any, storage_options: dict[str, Any]) -> None:
    vit.model.load_state_dict(safetensors.torch.load(checkpoint_file(folder, "model.safetensors", storage_options)))
    training = torch.load(io.BytesIO(checkpoint_file(folder, "training.pt", storage_options)), weights_only=True)
    optimizer.load_state_dict(training["optimizer"])
    schedule.load_state_dict(training["schedule"])


# ---------------------------------------------------------------------------- the loop


def lr_factor(config: DistillConfig) -> Callable[[int], float]:
    """The learning rate at a step, relative to --lr: linear warmup, then step decay or cosine."""
    decay_every = config.step_size or max(1, config.steps // 3)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
        if config.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        return warm * config.gamma ** (step // decay_every)

    return factor


def train_worker(config: DistillConfig, *, rank: int = 0, world: int = 1, device: str | torch.device = "cpu", report: Report = print) -> dict[str, Any]:
    """Train on this worker's share of the training images; rank 0 checkpoints and writes the model.

    With world > 1 the process group must exist (Ray Train makes it); gradients are averaged by DDP.
    Returns the final state (step, losses, held-out distances).
    """
    device = torch.device(device)
    options = config.storage_options
    store = FeatureStore.open(config.store, options)
    layer, teacher = store.layer_index(config.layer), store.config
    vit = load_store_model(teacher["model"], teacher["weights"], pretrained=config.pretrained, weights=config.weights, storage_options=options, device=device)
    params = trainable_parameters(vit, layer, teacher["norm"], config.trainable, config.last_blocks)
    tap = PlainTap(vit, layer, teacher["norm"])  # evaluated on rank 0 alone: never through DDP's collectives
    student: nn.Module = tap
    if world > 1:
        student = nn.parallel.DistributedDataParallel(tap, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # the penalty is the explicit L2 term
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
    loader = TargetLoader(store, vit, layer)
    train_rows, held_rows = split_rows(store, config.holdout)

    state: dict[str, Any] = {"step": 0, "loss": None}
    found = latest_checkpoint(config.out, options)
    if found:
        folder, state = found
        restore_checkpoint(folder, vit, optimizer, schedule, options)
        report({"event": "resumed", "step": state["step"], "from": folder})
    elif rank == 0:
        state["teacher_distance"] = holdout_distance(tap, loader, held_rows, device, config.batch_size)
    stream = batches(train_rows[rank::world], config.batch_size, seed=config.seed * 1000 + rank)
    for _ in range(state["step"]):  # replay the data order up to the checkpoint
        next(stream)

    student.train()
    started, seen = time.perf_counter(), 0
    for step in range(state["step"] + 1, config.steps + 1):
        images, targets = loader(next(stream))
        predicted = student(images.to(device))
        distance = F.mse_loss(predicted, targets.to(device)) if config.loss == "mse" else F.l1_loss(predicted, targets.to(device))
        penalty = config.l2 * sum((p**2).sum() for p in params)
        optimizer.zero_grad(set_to_none=True)
        (distance + penalty).backward()
        optimizer.step()
        schedule.step()
        seen += len(images)
        state = {**state, "step": step, "loss": distance.item(), "penalty": penalty.item()}
        if step % config.log_every == 0 or step == config.steps:
            rate = seen * world / (time.perf_counter() - started)
            report({"step": step, "loss": state["loss"], "penalty": state["penalty"], "lr": schedule.get_last_lr()[0], "images_per_s": rate})
        if step % config.checkpoint_every == 0 or step == config.steps:
            if step == config.steps:
                student.eval()
                state["student_distance"] = holdout_distance(tap, loader, held_rows, device, config.batch_size) if rank == 0 else None
            if rank == 0:
                save_model_checkpoint(config.out, state, vit, optimizer, schedule, options)
            if world > 1:
                torch.distributed.barrier()  # no worker runs ahead of a checkpoint it might resume from
    if rank == 0:
        write_model(config, store, vit, layer, state, len(train_rows), len(held_rows))
    return state


def read_sidecar(out: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    return json.loads(read_uri(join(out, "model.json"), storage_options or {}))


def write_model(config: DistillConfig, store: FeatureStore, vit: ViT, layer: int, state: dict[str, Any], trained: int, held: int) -> None:
    """The final student and a sidecar naming its teacher store and config."""
    options = config.storage_options
    write_bytes(join(config.out, "model.safetensors"), model_bytes(vit), options)
    teacher = store.config
    sidecar = {
        "model": teacher["model"],
        "teacher_store": store.uri,
        "teacher": {k: teacher[k] for k in ("weights", "stride", "boundary", "norm", "image_size", "resize")} | {"layer": layer, "views": len(teacher["shifts"])},
        "config": config.fingerprint(),
        "steps": state["step"],
        "images": {"train": trained, "held_out": held},
        "final_loss": state["loss"],
        "held_out_distance": {"teacher": state.get("teacher_distance"), "student": state.get("student_distance")},
        "use": f"python jobs/extract.py --model {teacher['model']} --weights {join(config.out, 'model.safetensors')} --shifts 0,0 --stride {vit.patch_size} ...",
    }
    write_bytes(join(config.out, "model.json"), json.dumps(sidecar, indent=2).encode(), options)
