"""SRT feature extraction: source -> decode -> SRT -> store -> manifest.

Modules, in the order data flows through them:
    sources   list a dataset through fsspec into a deterministic plan of work shards
    images    decode, orient, resize and normalize; record the pixel <-> feature-cell transform
    models    load a timm ViT and tap token grids (blocks, attention keys) out of it
    srt       the SRT math: shift ensembles, exact separable aggregation, partial sums (pure torch)
    store     Zarr v3 feature arrays, and the reader
    manifest  Arrow/Parquet manifest parts, one per committed shard
"""

__version__ = "0.1.0"
