"""The one typed job config: it generates the CLI, is validated before any work, and is stored.

Every field is a flag (`layers` -> `--layers`) with the same default everywhere. `resolve`
checks the flags against the model's facts (patch size, depth) without loading weights and
returns a `ResolvedConfig`: what the stored provenance and the resume fingerprint are made of.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.engine.aggregation import BOUNDARIES, validate_stride
from pipeline.engine.models import ModelFacts, Tap, describe_model
from pipeline.engine.positions import RESIZES, reference_rule
from pipeline.engine.shifts import DEFAULT_RANDOM_SHIFTS, Shift, grid_shifts, random_shifts, validate_shifts
from pipeline.engine.srt import DEFAULT_BATCH_SIZE
from pipeline.extraction.flags import ConfigError, Flags, masked, option, show_value, with_absolute_uris
from pipeline.extraction.images import DECODERS, DEFAULT_MAX_TOKENS
from pipeline.extraction.presets import PRESETS, apply_preset
from pipeline.extraction.reading import DEFAULT_READ_RETRIES, READ_DEADLINE_SECONDS
from pipeline.extraction.weights import weights_id
from pipeline.store.layout import OUTPUTS, StoreSpec, stored_provenance
from pipeline.store.schemas import STORE_FORMAT_VERSION
from pipeline.store.uris import normalize_uri

RESIZE_POLICIES = ("square", "aspect", "aspect-floor64", "pad")
RESAMPLERS = ("bicubic", "cv2-bilinear")
DECODER_CHOICES = ("auto", *DECODERS)
POS_EMBED_RESIZE_CHOICES = ("auto", *RESIZES)
STORE_DTYPES = ("float16", "float32")
CODECS = ("lz4", "blosc", "zstd", "none")  # lz4: blosc-lz4 with bit shuffle; blosc: blosc-zstd (smaller, about 3x the write CPU): bench/RESULTS.md
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RETRYABLE_ERROR_KINDS = ("read", "empty", "decode")  # decided by the bytes fetched at run time; the rest by the plan or the config



@dataclass
class ExtractConfig(Flags):
    dataset: str = field(default="", metadata=option("dataset URI: directory, glob, file list (.txt/.csv, or a .parquet of URIs given as --dataset itself), .tar shards or Parquet of image bytes (local, s3://, gs://, http(s)://, memory://); README: Datasets made by img2dataset", required=True, uri="input"))
    out: str = field(default="", metadata=option("output Zarr store URI (resumed if it exists)", required=True, uri="output"))
    model: str = field(default="vit_small_patch16_224.dino", metadata=option("timm ViT name"))
    pretrained: bool = field(default=False, metadata=option("load timm's pretrained weights (needs the model hub)"))
    weights: str | None = field(default=None, metadata=option("checkpoint URI (safetensors or torch; DINO-style wrappers unwrapped)", uri="hashed"))
    seed: int = field(default=0, metadata=option("seed for random-init weights (neither --pretrained nor --weights)"))
    layers: tuple[int, ...] = field(default=(-1,), metadata=option("block indices to tap, comma-separated; negative counts from the end", parse="ints"))
    keys: tuple[int, ...] = field(default=(), metadata=option("blocks whose attention keys are stored too, beside the block outputs (TokenCut's features), e.g. -1", parse="ints"))
    radius: int | None = field(default=None, metadata=option("shift grid {-n..n}^2"))
    shifts: tuple[Shift, ...] | None = field(default=None, metadata=option("explicit shifts 'dy,dx;dy,dx;...' (duplicates allowed)", parse="shifts"))
    random_shifts: int | None = field(default=None, metadata=option(f"K distinct random sub-token shifts (seeded by --shift-seed); {DEFAULT_RANDOM_SHIFTS} when no shift flag is given"))
    shift_seed: int = field(default=0, metadata=option("seed of --random-shifts"))
    adaptive_tol: float | None = field(default=None, metadata=option("adaptive views: stop adding shifts to an image once its SRT map moves less than this (relative) between checks; shifts visited in a spread-out order"))
    min_views: int = field(default=8, metadata=option("adaptive views: never fewer views than this"))
    stride: int | None = field(default=None, metadata=option("output stride in pixels; must divide the patch size (default: half the patch size, or the patch size if odd)"))
    boundary: str = field(default="reflect", metadata=option("fill of the strip a shift uncovers", choices=BOUNDARIES))
    norm: bool = field(default=True, metadata=option("apply the model's final norm to every tap (--no-norm to skip)"))
    image_size: int = field(default=224, metadata=option("model input: square side, or shorter side with --resize aspect; a multiple of the patch size"))
    resize: str = field(default="square", metadata=option("square: shorter side then centre crop; aspect: shorter side, longer side rounded to the patch size; aspect-floor64: shorter side, longer side floored to a multiple of 64 (DINO's video evaluation); pad: original size, each view centre-padded with zeros to a multiple of the patch after shifting (DINOv2's depth evaluation; --image-size unused, needs --boundary zeros)", choices=RESIZE_POLICIES))
    resample: str = field(default="bicubic", metadata=option("resampling: Pillow's antialiased bicubic, or cv2-bilinear (cv2.resize's default, as DINO's evaluation reads frames; not with --resize square)", choices=RESAMPLERS))
    reducing_gap: float = field(default=0.0, metadata=option("G >= 1: decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where the shorter side stays at least G x --image-size, then resample as usual: about 2x the decode rate of 3-12 MP photos, pixels within 2 levels of a full decode (Pillow's reducing_gap; bench/RESULTS.md); 0: decode in full"))
    pos_embed_resize: str = field(default="auto", metadata=option("position embeddings of inputs other than the model's native size: reference (resized as the model family's own code resizes them: DINO and DINOv2 scale by (grid + 0.1) / side without antialiasing), timm (timm's antialiased resize to the grid); auto: reference for a new store, for a resumed store what it was made with. Families without code of their own (ViT, DeiT) and DINOv2 with registers resize as timm either way", choices=POS_EMBED_RESIZE_CHOICES))
    decoder: str = field(default="auto", metadata=option("image decoder of 8-bit RGB and grey JPEGs: device (a shard's JPEGs decoded in batches on the model's device, nvJPEG on a GPU, and resized there exactly as Pillow resizes), torch (TorchCodec and torch's resize on the host's decode threads, ops that release the interpreter lock) or pillow; all give the same model inputs (device on a CPU bit for bit, on a GPU nvJPEG's decode against libjpeg-turbo's; torch within 0.1/255; bench/RESULTS.md), the other formats always go to Pillow; auto: device beside a GPU, torch elsewhere", choices=DECODER_CHOICES))
    mean: tuple[float, ...] | None = field(default=None, metadata=option("normalization mean, R,G,B (default: the model's)", parse="floats"))
    std: tuple[float, ...] | None = field(default=None, metadata=option("normalization std, R,G,B (default: the model's)", parse="floats"))
    preset: str | None = field(default=None, metadata=option(f"the paper's settings for a task, recorded in the store ({', '.join(PRESETS)}; README: Presets)", choices=tuple(PRESETS)))
    outputs: tuple[str, ...] = field(default=OUTPUTS, metadata=option("what to store, comma-separated: dense (the maps: nearly all the bytes), cls, pooled, registers (where the model has them); cls,pooled suits retrieval", parse="words"))
    pca_dims: int = field(default=0, metadata=option("store dense maps as K channels: their coefficients on a PCA basis fitted on the first 2 shards and stored beside them (FeatureStore.dense(..., full=True) projects back); 0: all channels"))
    dtype: str = field(default="float16", metadata=option("stored feature dtype", choices=STORE_DTYPES))
    codec: str = field(default="lz4", metadata=option("compression of stored features: lz4 (blosc-lz4, bit shuffle: fast enough for a GPU's output), blosc (blosc-zstd: a store a twelfth smaller for about 3x the write CPU), zstd, none; bench/RESULTS.md", choices=CODECS))
    precision: str = field(default="auto", metadata=option("model precision on CUDA (autocast; aggregation stays fp32); auto: bf16 where the GPU has it, else fp16; CPU runs fp32", choices=PRECISIONS))
    batch_size: int = field(default=0, metadata=option(f"views per forward pass; 0: {DEFAULT_BATCH_SIZE} on CPU, on CUDA as many as half the free GPU memory holds (measured at start)"))
    shard_size: int = field(default=32, metadata=option("images per work shard = per Zarr shard = per manifest part"))
    max_pixels: int = field(default=89_478_485, metadata=option("decompression-bomb limit: images with more pixels become error rows"))
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata=option("largest model input in patches, under every --resize policy: images that would make more become too_large error rows"))
    num_actors: int = field(default=0, metadata=option("extraction actors; 0: one per GPU, or CPU cores / --cpus-per-actor without GPUs"))
    gpus_per_actor: float = field(default=1.0, metadata=option("GPUs each actor holds (GPU clusters)"))
    cpus_per_actor: int = field(default=0, metadata=option("CPU threads each actor uses (decode, writes); 0: with GPUs each GPU's share of its node's CPUs, else min(4, cores)"))
    split_shifts: str = field(default="auto", metadata=option("shift batches per shard spread over actors: auto (split only when fewer pending images than actors) or G"))
    max_retries: int = field(default=3, metadata=option("attempts per work unit after the first, on actor death or task failure (exponential backoff)"))
    read_retries: int = field(default=DEFAULT_READ_RETRIES, metadata=option(f"attempts after the first for an image read that failed transiently (connection refused or reset, timeout, throttling, 5xx), backoff from 0.5 s, within {READ_DEADLINE_SECONDS:.0f} s per shard; permanent failures (not found, denied) are not retried"))
    retry_errors: tuple[str, ...] = field(default=(), metadata=option(f"on a rerun, recompute the committed shards holding error rows of these kinds (comma-separated, of {', '.join(RETRYABLE_ERROR_KINDS)}; the bare flag means read) and replace those rows", parse="words", nargs="?", const=("read",)))
    straggler_timeout: float | None = field(default=None, metadata=option("seconds before a running unit is also started elsewhere (default: 4x the median unit time, at least 60; 0: never)"))
    storage_options: dict[str, Any] = field(default_factory=dict, metadata=option("JSON of fsspec storage options (endpoint, credentials); never logged or stored", parse="json"))
    overwrite: bool = field(default=False, metadata=option("delete an existing output instead of resuming it"))
    append: bool = field(default=False, metadata=option("list --dataset again and extract what is new (containers, image files, lines added to a file list) after the existing rows; nothing committed changes, inputs gone since are reported"))


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated config with everything made explicit: layers resolved, shifts listed, stride set."""

    config: ExtractConfig
    facts: ModelFacts
    layers: tuple[int, ...]
    keys: tuple[int, ...]
    shifts: tuple[Shift, ...]
    stride: int
    weights_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pos_embed_resize: str = "timm"  # "reference" or "timm": `auto` resolved

    @property
    def taps(self) -> tuple[Tap, ...]:
        """Everything stored per image: block outputs, then attention keys."""
        return tuple(Tap("block", layer) for layer in self.layers) + tuple(Tap("keys", layer) for layer in self.keys)

    def describe(self) -> str:
        """One short line of what the run computes (the log's; every flag is in summary.json)."""
        c = self.config
        shifts = f"{len(self.shifts)} views" + (f", adaptive {c.adaptive_tol:g}" if c.adaptive_tol is not None else "")
        return (
            f"config: {c.model} ({self.weights_id if len(self.weights_id) <= 40 else self.weights_id[:37] + '...'}), layers {','.join(map(str, self.layers))}, {shifts}, stride {self.stride}, "
            f"{c.resize} {c.image_size}, outputs {','.join(c.outputs)}" + (f", preset {c.preset}" if c.preset else "")
        )

    def flags(self) -> dict[str, Any]:
        """Every flag as this run uses it (defaults resolved: blocks, shifts, stride, normalization),
        credential-like storage options masked: logged at start and kept in summary.json."""
        used = {"layers": list(self.layers), "keys": list(self.keys), "shifts": [list(s) for s in self.shifts], "stride": self.stride}
        return {**masked(self.config), **used, "mean": list(self.mean), "std": list(self.std)}

    def provenance(self) -> dict[str, Any]:
        """What is stored in the group attributes: the fingerprint, the package version and the
        --decoder flag (`auto` is resolved by each worker for its device: images.resolve_decoder)."""
        return {**self.fingerprint(), "package_version": __version__, "decoder": self.config.decoder}

    def store_spec(self) -> StoreSpec:
        """What the store needs of this run to lay out and write its arrays."""
        c = self.config
        return StoreSpec(
            out=c.out,
            storage_options=c.storage_options,
            provenance=self.provenance(),
            taps=self.taps,
            outputs=c.outputs,
            fixed_shapes=self.fixed_shapes(),
            shard_size=c.shard_size,
            stride=self.stride,
            dtype=c.dtype,
            codec=c.codec,
        )

    def fixed_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shapes of the arrays known before any image is read."""
        facts, c = self.facts, self.config
        shapes: dict[str, tuple[int, ...]] = {"pooled": (facts.embed_dim,)}
        if facts.num_prefix_tokens > facts.num_registers:
            shapes["cls"] = (facts.embed_dim,)
        if facts.num_registers:
            shapes["registers"] = (facts.num_registers, facts.embed_dim)
        if c.resize == "square":
            side = c.image_size // self.stride
            shapes["dense"] = (c.pca_dims or facts.embed_dim, side, side)
        return shapes

    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides the stored values and layout; a resumed run must match it.

        Storage options are never part of it (credentials), nor is the batch size (speed only).
        """
        c = self.config
        return {
            "model": c.model,
            "weights": self.weights_id,
            "layers": list(self.layers),
            "keys": list(self.keys),
            "shifts": [list(s) for s in self.shifts],
            "stride": self.stride,
            "boundary": c.boundary,
            "adaptive_tol": c.adaptive_tol,
            "min_views": c.min_views if c.adaptive_tol is not None else None,
            "norm": c.norm,
            "image_size": c.image_size,
            "resize": c.resize,
            "resample": c.resample,
            **({"reducing_gap": c.reducing_gap} if c.reducing_gap else {}),  # absent when off: stores from before it still match
            "preset": c.preset,
            "outputs": list(c.outputs),
            "pca_dims": c.pca_dims,
            "dtype": c.dtype,
            "codec": c.codec,
            "precision": c.precision,
            # only where the model family's rule is not timm's: stores from before the flag (timm's) still match
            **({"pos_embed_resize": "reference"} if self.pos_embed_resize == "reference" and reference_rule(c.model) else {}),
            "shard_size": c.shard_size,
            "max_pixels": c.max_pixels,
            **({"max_tokens": c.max_tokens} if c.max_tokens != DEFAULT_MAX_TOKENS else {}),  # absent at the default: earlier stores still match
            "dataset": normalize_uri(c.dataset),
            "patch_size": self.facts.patch_size,
            "embed_dim": self.facts.embed_dim,
            "num_prefix_tokens": self.facts.num_prefix_tokens,
            "num_registers": self.facts.num_registers,
            "mean": list(self.mean),
            "std": list(self.std),
            "store_format": STORE_FORMAT_VERSION,
        }


def default_stride(patch: int) -> int:
    return patch // 2 if patch % 2 == 0 else patch




def resolve(config: ExtractConfig, facts: ModelFacts | None = None) -> ResolvedConfig:
    """Validate every flag (naming it on error) and make the config explicit. Loads no weights."""
    f = config.flags
    for name in ("dataset", "out", "model"):
        if not getattr(config, name):
            raise ConfigError(f[name], "is required")
    config = with_absolute_uris(config)
    if facts is None:
        try:
            facts = describe_model(config.model)
        except ValueError as error:
            raise ConfigError(f["model"], str(error)) from error
    config = apply_preset(config, facts)
    if config.pretrained and config.weights:
        raise ConfigError(f["weights"], "give either --pretrained or --weights, not both")
    for name in ("shard_size", "image_size", "max_pixels", "max_tokens"):
        if getattr(config, name) < 1:
            raise ConfigError(f[name], f"must be a positive integer, got {getattr(config, name)}")
    if config.append and config.overwrite:
        raise ConfigError(f["append"], "adds to an existing output, and --overwrite deletes it: give one of them")
    if unknown := [kind for kind in config.retry_errors if kind not in RETRYABLE_ERROR_KINDS]:
        raise ConfigError(f["retry_errors"], f"{', '.join(unknown)}: only {', '.join(RETRYABLE_ERROR_KINDS)} errors depend on the bytes read, the others would come out the same")
    for name in ("batch_size", "num_actors", "cpus_per_actor", "max_retries", "read_retries"):
        if getattr(config, name) < 0:
            raise ConfigError(f[name], f"must be 0 or more, got {getattr(config, name)}")
    if config.gpus_per_actor <= 0:
        raise ConfigError(f["gpus_per_actor"], f"must be positive, got {config.gpus_per_actor}")
    if config.straggler_timeout is not None and config.straggler_timeout < 0:
        raise ConfigError(f["straggler_timeout"], f"must be 0 (never) or positive seconds, got {config.straggler_timeout}")
    if config.adaptive_tol is not None and config.adaptive_tol < 0:
        raise ConfigError(f["adaptive_tol"], f"must be 0 or more, got {config.adaptive_tol}")
    if config.min_views < 1:
        raise ConfigError(f["min_views"], f"must be a positive integer, got {config.min_views}")
    if config.adaptive_tol is not None and config.split_shifts not in ("auto", "1"):
        raise ConfigError(f["split_shifts"], "adaptive views (--adaptive-tol) decide per image from all its views: they cannot be split")
    if config.split_shifts != "auto" and not (config.split_shifts.isdigit() and int(config.split_shifts) >= 1):
        raise ConfigError(f["split_shifts"], f"must be 'auto' or a positive integer, got {config.split_shifts!r}")
    for name, allowed in (("boundary", BOUNDARIES), ("resize", RESIZE_POLICIES), ("resample", RESAMPLERS), ("decoder", DECODER_CHOICES), ("pos_embed_resize", POS_EMBED_RESIZE_CHOICES), ("dtype", STORE_DTYPES), ("codec", CODECS), ("precision", PRECISIONS)):
        if getattr(config, name) not in allowed:
            raise ConfigError(f[name], f"must be one of {allowed}, got {getattr(config, name)!r}")
    if config.resize == "pad" and config.boundary != "zeros":
        raise ConfigError(f["resize"], "pad fills the padding with zeros, so shifted views must be filled with zeros too: add --boundary zeros")
    if not config.outputs or any(o not in OUTPUTS for o in config.outputs):
        raise ConfigError(f["outputs"], f"give some of {', '.join(OUTPUTS)}, got {','.join(config.outputs) or 'nothing'}")
    config = dataclasses.replace(config, outputs=tuple(o for o in OUTPUTS if o in config.outputs))  # one order: one fingerprint
    if not 0 <= config.pca_dims < facts.embed_dim:
        raise ConfigError(f["pca_dims"], f"must be 0 (off) or fewer than the model's {facts.embed_dim} channels, got {config.pca_dims}")
    if config.pca_dims and "dense" not in config.outputs:
        raise ConfigError(f["pca_dims"], "reduces dense maps, and --outputs stores none: add dense to --outputs or drop --pca-dims")
    if config.reducing_gap and (config.reducing_gap < 1 or config.resize == "pad" or config.resample != "bicubic"):
        raise ConfigError(f["reducing_gap"], f"must be 0 (off) or at least 1, with Pillow's resampling of resized inputs (not --resize pad, not --resample cv2-bilinear); got {config.reducing_gap:g}")
    if config.resample == "cv2-bilinear" and config.resize == "square":
        raise ConfigError(f["resample"], "cv2-bilinear resizes whole images: use it with --resize aspect or aspect-floor64")
    for name in ("mean", "std"):
        value = getattr(config, name)
        if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
            raise ConfigError(f[name], f"give three values R,G,B{' (positive)' if name == 'std' else ''}, got {show_value(value)}")
    patch = facts.patch_size
    if config.resize == "aspect-floor64" and 64 % patch:
        raise ConfigError(f["resize"], f"aspect-floor64 floors to multiples of 64, which patch size {patch} of {config.model} does not divide")
    if config.image_size % patch:
        raise ConfigError(f["image_size"], f"{config.image_size} is not a multiple of the patch size {patch} of {config.model}")
    if config.resize != "pad" and (config.image_size // patch) ** 2 > config.max_tokens:
        raise ConfigError(f["max_tokens"], f"{config.max_tokens} is below the {(config.image_size // patch) ** 2} patches of the smallest --image-size {config.image_size} input: every image would be refused")
    layers, keys = _resolve_blocks(config, facts, "layers"), _resolve_blocks(config, facts, "keys")
    if not layers:
        raise ConfigError(f["layers"], "give at least one block index")
    shifts = _resolve_shifts(config, patch)
    stride = default_stride(patch) if config.stride is None else config.stride
    try:
        validate_stride(stride, patch)
    except ValueError as error:
        raise ConfigError(f["stride"], str(error)) from error
    try:
        identity = weights_id(config.model, pretrained=config.pretrained, weights=config.weights, seed=config.seed, storage_options=config.storage_options)
    except (OSError, ValueError) as error:
        raise ConfigError(f["weights"], f"cannot read {config.weights}: {error}") from error
    mean, std = config.mean or facts.mean, config.std or facts.std
    return ResolvedConfig(config=config, facts=facts, layers=layers, keys=keys, shifts=shifts, stride=stride, weights_id=identity, mean=tuple(mean), std=tuple(std), pos_embed_resize=_resolve_pos_embed_resize(config))


def _resolve_pos_embed_resize(config: ExtractConfig) -> str:
    """`--pos-embed-resize auto`: the model family's reference rule for a new store; for a store
    being resumed, the rule it was made with (timm's in stores from before the flag)."""
    if config.pos_embed_resize != "auto":
        return config.pos_embed_resize
    existing = None if config.overwrite else stored_provenance(config.out, config.storage_options)
    return "reference" if existing is None else existing.get("pos_embed_resize", "timm")


def _resolve_blocks(config: ExtractConfig, facts: ModelFacts, name: str) -> tuple[int, ...]:
    """The sorted, de-duplicated non-negative block indices of `--layers` or `--keys`."""
    blocks = set()
    for block in getattr(config, name):
        if not -facts.depth <= block < facts.depth:
            raise ConfigError(config.flags[name], f"{block} is out of range for {config.model}, which has {facts.depth} blocks")
        blocks.add(block % facts.depth)
    return tuple(sorted(blocks))


def _resolve_shifts(config: ExtractConfig, patch: int) -> tuple[Shift, ...]:
    f = config.flags
    given = [name for name in ("radius", "shifts", "random_shifts") if getattr(config, name) is not None]
    if len(given) > 1:
        raise ConfigError(f[given[1]], f"give only one of --radius, --shifts, --random-shifts (also got {f[given[0]]})")
    name = given[0] if given else "random_shifts"
    try:
        if name == "shifts":
            return validate_shifts(config.shifts, patch)
        if name == "radius":
            return validate_shifts(grid_shifts(config.radius), patch)
        count = DEFAULT_RANDOM_SHIFTS if config.random_shifts is None else config.random_shifts
        return tuple(random_shifts(count, patch, config.shift_seed))
    except ValueError as error:
        raise ConfigError(f[name], str(error)) from error


