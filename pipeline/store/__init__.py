"""The feature store: chunked Zarr v3 arrays indexed by Parquet manifests, and the URIs they live at.

    schemas   the versioned Arrow schemas of the plan and the manifest, and the store format version
    uris      one spelling per location, whole-object reads through fsspec (checkpoints, sidecars)
    layout    the Zarr layout: creation with a provenance check, shard writes, the PCA basis
    objects   whole Zarr shards and chunks encoded here and written in one go (zarr-python's bytes)
    plan      the work plan: a part per listed input and an index of parts; a shard's rows read from them
    manifest  manifest parts: one atomic commit per shard, range files of shards, reading, counts
    reader    `FeatureStore`: provenance, manifest and features by image_id, for every task

May import: the engine, fsspec, zarr, pyarrow; never extraction, tasks or commands.
A run describes itself to the store as a `layout.StoreSpec`, so the store knows no job flags.
"""
