"""SRT feature extraction: source -> decode -> SRT -> store -> manifest, then retrieval.

Modules, in the order data flows through them:
    sources      list a dataset through fsspec into a deterministic plan of work shards; read bytes
    images       decode, orient, resize and normalize; record the pixel <-> feature-cell transform
    models       load a timm ViT and tap token grids (blocks, attention keys) out of it
    srt          the SRT math: shift ensembles, exact separable aggregation, partial sums (pure torch)
    reference    the naive full-resolution chain the engine is tested and benchmarked against
    store        the Zarr v3 feature store and its reader
    manifest     Parquet manifest parts, one per committed shard
Orchestration:
    config       the typed job config: CLI, validation, provenance, resume fingerprint
    worker       one shard through read -> decode -> SRT -> store -> manifest
    runner       driver steps (plan, resume, summary) and the in-process runner
    distributed  the Ray runner: actor pool, split shift batches, retries, stragglers
Consumers:
    retrieval    descriptors and FAISS indexes over a store
    ranking      retrieval metrics (revisited Oxford/Paris protocol) and ground-truth formats
    pictures     feature maps to RGB (joint PCA) for looking at what SRT does
    raydata      SRT inside a Ray Data pipeline (SRTPredictor), a store as a Ray Dataset (read_store)
Entry points:
    commands     the command-line jobs, installed as srt-* console scripts (jobs/*.py run them from a checkout)
"""

__version__ = "0.1.0"
