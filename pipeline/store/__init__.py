"""The feature store: Zarr v3 layout, shard writes, the reader, manifests."""
