"""One work shard through read -> decode -> SRT -> store -> manifest.

`ShardWorker` holds a loaded model and an open store. The in-process runner calls it in a loop;
Ray actors each own one. The steps are separate: `load` (read, decode, start the copy to a GPU),
`compute` (SRT partial sums, on the model's device), `assemble` (finalize there, bring back the
stored dtype) and `commit` (host work only: arrays, then the manifest part), so shards overlap in
the three stages and shift batches of one shard can be computed on different workers (`compute`
with a shift subset) and committed once.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.engine import pca
from pipeline.engine.accelerator import (
    HostBuffers,
    ViewBudget,
    autocast_dtype,
    copies_done,
    on_stream,
    to_host,
    view_budget,
)
from pipeline.engine.aggregation import PartialSum
from pipeline.engine.models import Tap, ViT
from pipeline.engine.shifts import Shift
from pipeline.engine.srt import DEFAULT_BATCH_SIZE, SRT
from pipeline.extraction.config import ResolvedConfig
from pipeline.extraction.device_decoding import decode_encoded
from pipeline.extraction.images import (
    DEFAULT_MAX_TOKENS,
    Encoded,
    ImageError,
    ImagePolicy,
    Prepared,
    normalize,
    prepare,
    prepare_or_defer,
    resolve_decoder,
)
from pipeline.extraction.reading import MissingCell, read_bytes
from pipeline.extraction.shards import LoadedShard, ShardArrays, ShardStats, input_tensors
from pipeline.extraction.weights import load_vit
from pipeline.store.layout import dense_path, open_group, read_basis, write_basis, write_shard
from pipeline.store.manifest import is_committed, write_part
from pipeline.store.objects import ObjectWriter
from pipeline.store.plan import PlanReader

log = logging.getLogger("srt")

MAX_IMAGES_PER_CALL = 8  # bounds the fp32 sums one SRT call holds, where views per pass allow
AUTO_VIEWS_PER_CALL = 256  # --batch-size 0: enough views per SRT call to fill a GPU's forward pass

Progress = Callable[[float, int], object]  # (images, views) computed since the last call


def build_engine(vit: ViT, provenance: dict[str, Any], *, batch_size: int) -> tuple[SRT, ImagePolicy]:
    """The SRT engine and image policy a store's provenance describes: what extraction uses, and
    what a query image must go through to be comparable with the store. `batch_size` 0: the
    default (16 views per pass; `accelerator.view_budget` fits more on a GPU)."""
    p = provenance
    vit.use_pos_embed_resize(p.get("pos_embed_resize", "timm"))  # absent: timm's, or a family whose rule it is
    srt = SRT(
        vit,
        layers=p["layers"],
        keys=p.get("keys", ()),
        shifts=[tuple(s) for s in p["shifts"]],
        stride=p["stride"],
        boundary=p["boundary"],
        norm=p["norm"],
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        autocast=autocast_dtype(p["precision"], vit.device),
        tolerance=p["adaptive_tol"],
        min_views=p["min_views"] or 1,
    )
    decoder = resolve_decoder(p.get("decoder", "pillow"), vit.device)
    policy = ImagePolicy(p["image_size"], p["resize"], vit.patch_size, tuple(p["mean"]), tuple(p["std"]), p["max_pixels"], p.get("resample", "bicubic"), p.get("reducing_gap", 0.0), decoder, p.get("max_tokens", DEFAULT_MAX_TOKENS))
    return srt, policy


def images_per_call(batch_size: int, views: int) -> int:
    """Images per SRT call: enough that views fill whole forward passes of `batch_size` (0: a GPU's
    worth), at most MAX_IMAGES_PER_CALL where that suffices. It depends on the flags alone, so
    every actor of a split-shift job groups a shard's images the same way."""
    target = batch_size or AUTO_VIEWS_PER_CALL
    return max(min(MAX_IMAGES_PER_CALL, math.lcm(target, views) // views), -(-target // views))


class ShardWorker:
    def __init__(self, resolved: ResolvedConfig, plan: PlanReader, *, vit: ViT | None = None, device: str | None = None) -> None:
        c = resolved.config
        self.resolved = resolved
        self.plan = plan
        self.store_spec = resolved.store_spec()
        self.vit = vit or load_vit(c.model, pretrained=c.pretrained, weights=c.weights, seed=c.seed, device=device, storage_options=c.storage_options)
        if self.vit.weights_id != resolved.weights_id:
            raise RuntimeError(f"weights changed since the run was planned: {self.vit.weights_id} != {resolved.weights_id}")
        self.srt, self.policy = build_engine(self.vit, resolved.provenance(), batch_size=c.batch_size)
        self.group = open_group(c.out, "r+", c.storage_options, use_consolidated=False)
        self.arrays: dict[str, ObjectWriter] = {}  # opened once, written by every shard
        self.bases: dict[str, pca.Basis] = {}  # --pca-dims: each tap's basis, read from the store once there
        self.images_per_call = images_per_call(c.batch_size, len(resolved.shifts))
        self.budget: ViewBudget = view_budget(self.srt, c.batch_size, (c.image_size, c.image_size))
        self.decoders = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="decode")
        self.copies = torch.cuda.Stream(self.vit.device) if self.vit.device.type == "cuda" else None
        self.buffers = HostBuffers(self.vit.device)  # the shards' blocks, reused once committed
        log.info(
            "model on %s, %s, %s views per forward pass", self.vit.device, self.srt.autocast or "fp32",
            self.budget.fixed or f"up to {self.budget.views((c.image_size, c.image_size), self.vit.patch_size)}",
        )

    def load(self, shard: int) -> LoadedShard:
        """Read the shard's plan rows, then read and decode each; failures become ImageErrors, never exceptions.
        Images decode in parallel on the worker's threads (Pillow releases the GIL while decoding
        and resizing: 1.9x at 224² and 1.6x at 448² on 2 threads, bench/RESULTS.md)."""
        config = self.resolved.config
        rows = self.plan.rows(shard)
        blobs = read_bytes(rows, config.storage_options, retries=config.read_retries)
        loaded = LoadedShard(shard, rows, list(self.decoders.map(self._input_of, rows, blobs)))
        if self.policy.decoder == "device":
            self._decode_on_device(loaded, blobs)
        if self.copies is not None:
            loaded.upload(self.vit.device, self.copies)
        return loaded

    def _decode_on_device(self, loaded: LoadedShard, blobs: list[bytes | Exception]) -> None:
        """--decoder device: the shard's JPEGs decoded together on the model's device (on the copy
        stream beside a GPU); one the device cannot decode goes to the host's decoders."""
        decode = functools.partial(decode_encoded, loaded.inputs, self.policy, self.vit.device, lambda i: self._prepared(blobs[i]))
        loaded.inputs, done = on_stream(self.copies, decode, input_tensors)
        if done is not None:
            loaded.uploads.append(done)

    def _input_of(self, row: dict[str, Any], blob: bytes | Exception) -> Prepared | Encoded | ImageError:
        if row["error_kind"] is not None:
            return ImageError(row["error_kind"], row["error"])
        if row["duplicate_of"] is not None:
            return ImageError("duplicate", f"same URI or key as image_id {row['duplicate_of']}")
        if isinstance(blob, MissingCell):
            return ImageError("missing", str(blob))
        if isinstance(blob, Exception):
            return ImageError("read", f"{type(blob).__name__}: {blob}")
        return self._prepared(blob, prepare_or_defer)

    def _prepared(self, blob: bytes, decode: Callable[[bytes, ImagePolicy], Prepared | Encoded] = prepare) -> Prepared | Encoded | ImageError:
        try:
            return decode(blob, self.policy)
        except ImageError as error:
            return error

    def compute(self, loaded: LoadedShard, shifts: tuple[Shift, ...] | None = None, progress: Progress | None = None) -> list[PartialSum]:
        """Partial sums over `shifts` (default all) for each group of `loaded.groups(...)`, left on
        the model's device. `progress(images, views)` after each group, so progress bars move
        within a shard: images weighted by the share of the shifts computed (a split shard's
        batches add up to each image once), views as computed."""
        for upload in loaded.uploads:
            torch.cuda.current_stream(self.vit.device).wait_event(upload)
        share = len(shifts) / len(self.srt.shifts) if shifts is not None else 1.0
        partials = []
        for members in loaded.groups(self.images_per_call):
            padded = loaded.inputs[members[0]].valid is not None
            valid = torch.stack([loaded.inputs[i].valid for i in members]) if padded else None
            pixels = torch.stack([loaded.inputs[i].pixels for i in members])
            partials.append(self._partial(normalize(pixels, self.policy.mean, self.policy.std, valid), shifts, valid))
            if progress is not None:
                adaptive = self.resolved.config.adaptive_tol is not None  # views differ per image: count them
                views = int(partials[-1].n_views.sum()) if adaptive else len(members) * len(shifts or self.srt.shifts)
                progress(len(members) * share, views)
        return partials

    def _partial(self, images: torch.Tensor, shifts: tuple[Shift, ...] | None, valid: torch.Tensor | None) -> PartialSum:
        """One SRT call at the budget's views per pass, retried at half as many after a GPU ran out of memory."""
        while True:
            self.srt.batch_size = self.budget.views(images.shape[2:], self.vit.patch_size)
            try:
                return self.srt.partial(images, shifts, valid)
            except torch.cuda.OutOfMemoryError:
                if self.srt.batch_size == 1:
                    raise
                self.budget.halve()
                torch.cuda.empty_cache()
                log.warning("%s ran out of memory at %d views per forward pass; retrying with fewer", self.vit.device, self.srt.batch_size)

    def assemble(self, loaded: LoadedShard, partials: list[PartialSum]) -> ShardArrays:
        """Finalize each group's sums where they are (on a GPU: there, so only the stored dtype
        travels back) into shard-sized host blocks, one per stored array."""
        arrays = ShardArrays()
        count = len(loaded.rows)
        for members, partial in zip(loaded.groups(self.images_per_call), partials):
            output = self.srt.finalize(partial)
            bucket = loaded.inputs[members[0]].bucket
            for tap in self.srt.taps:
                for path in self._fill(arrays.blocks, tap, bucket, members, count, output.dense[tap], output.prefix[tap], output.pooled[tap]):
                    arrays.filled.setdefault(path, []).extend(members)
            arrays.views.append((members, to_host(output.n_views)))
        for path, block in arrays.blocks.items():  # blocks start uninitialized: zero the rows no image filled
            block[np.setdiff1d(np.arange(count), arrays.filled[path])] = 0
        arrays.copied = copies_done(self.vit.device)
        return arrays

    def commit(self, loaded: LoadedShard, arrays: ShardArrays, started: float | None = None) -> ShardStats:
        """Write the shard's arrays, then its manifest part (the commit point). Host work only, so
        several shards can be written while the model computes the next. The arrays' blocks go
        back to the worker's buffers.

        A shard someone else already committed is left alone (first commit wins).
        """
        views_of = arrays.views_of()
        try:
            return self._commit(loaded, arrays, views_of, started)
        finally:
            self.buffers.give(arrays.blocks.values())

    def _commit(self, loaded: LoadedShard, arrays: ShardArrays, views_of: dict[int, int], started: float | None) -> ShardStats:
        started = time.perf_counter() if started is None else started
        config = self.resolved.config
        stats = ShardStats(shard=loaded.shard)
        if is_committed(config.out, loaded.shard, config.storage_options):
            stats.committed = False
            return stats
        stats.views = sum(views_of.values())
        write_shard(self.group, self.store_spec, loaded.shard, arrays.blocks, self.plan.index.size, self.arrays)
        itemsize = np.dtype(config.dtype).itemsize  # what was stored, not the empty rows
        stats.bytes_written = sum(len(rows) * math.prod(arrays.blocks[path].shape[1:]) * itemsize for path, rows in arrays.filled.items())
        rows = [self._manifest_row(row, item, views_of.get(i)) for i, (row, item) in enumerate(zip(loaded.rows, loaded.inputs))]
        if not write_part(config.out, loaded.shard, rows, config.storage_options):
            stats.committed = False
            return stats
        for row in rows:
            if row["status"] == "ok":
                stats.ok += 1
            else:
                stats.errors[row["error_kind"]] += 1
        stats.seconds = time.perf_counter() - started
        return stats

    def _fill(
        self,
        blocks: dict[str, np.ndarray],
        tap: Tap,
        bucket: str | None,
        members: list[int],
        count: int,
        dense: torch.Tensor,
        prefix: torch.Tensor,
        pooled: torch.Tensor,
    ) -> list[str]:
        """Copy one group's outputs into the shard-sized blocks they belong to; returns their paths."""
        facts = self.resolved.facts
        name = tap.name
        per_image = {dense_path(tap, bucket): self._reduced(tap, dense), f"pooled/{name}": pooled}
        if facts.num_prefix_tokens > facts.num_registers:
            per_image[f"cls/{name}"] = prefix[:, 0]
        if facts.num_registers:
            per_image[f"registers/{name}"] = prefix[:, -facts.num_registers :]
        per_image = {path: values for path, values in per_image.items() if path.split("/", 1)[0] in self.resolved.config.outputs}
        dtype = np.dtype(self.resolved.config.dtype)
        consecutive = members == list(range(members[0], members[0] + len(members)))
        for path, values in per_image.items():
            if path not in blocks:
                blocks[path] = self.buffers.take((count, *values.shape[1:]), dtype)
            block = torch.from_numpy(blocks[path])
            if consecutive:  # one pass: cast (on the GPU, if there) and copy into the block, without waiting for a GPU
                block[members[0] : members[0] + len(members)].copy_(values, non_blocking=True)
            else:
                block[members] = values.to(block.dtype).cpu()
        return list(per_image)

    def _reduced(self, tap: Tap, dense: torch.Tensor) -> torch.Tensor:
        """Dense maps as stored: all channels, or their coefficients on the tap's PCA basis (--pca-dims)."""
        if not self.resolved.config.pca_dims:
            return dense
        if tap.name not in self.bases:
            basis = read_basis(self.group, tap)
            if basis is None:
                raise RuntimeError(f"--pca-dims: no PCA basis of {tap.name} in {self.resolved.config.out}; the runner fits it first (fit_pca)")
            self.bases[tap.name] = basis
        return pca.project(dense, self.bases[tap.name].to(dense.device))

    def fit_pca(self, loads: list[LoadedShard], progress: Progress | None = None) -> list[ShardStats]:
        """--pca-dims K: fit each tap's basis on the dense maps of these shards (the first ones of the
        run), store it beside the arrays, then commit the shards, projected like every later one."""
        computed = [(loaded, self.compute(loaded, progress=progress)) for loaded in loads]
        for tap in self.srt.taps:
            maps = [self.srt.finalize(partial).dense[tap] for _, partials in computed for partial in partials]
            if not maps:
                raise RuntimeError(f"--pca-dims: shards {[loaded.shard for loaded in loads]} hold no image that decoded, nothing to fit the PCA on")
            write_basis(self.group, tap, pca.fit(maps, self.resolved.config.pca_dims), [loaded.shard for loaded in loads])
        return [self.commit(loaded, self.assemble(loaded, partials)) for loaded, partials in computed]

    def _manifest_row(self, row: dict[str, Any], item: Prepared | ImageError, n_views: int | None) -> dict[str, Any]:
        record = {"image_id": row["image_id"], "uri": row["uri"], "shard": row["shard"], "row": row["row"]}
        if isinstance(item, ImageError):
            return {**record, "status": "error", "error_kind": item.kind, "error": str(item)}
        return {
            **record,
            "status": "ok",
            "height": item.height,
            "width": item.width,
            "input_height": item.input_size[0],
            "input_width": item.input_size[1],
            "region": list(item.region),
            "bucket": item.bucket,
            "n_views": n_views,
        }
