"""Versioned schemas of what the pipeline writes: the plan, the manifest, the store layout.

Bump a version when a reader of the old layout would misread the new one. Readers check
`schema_version` in the Parquet metadata and `store_format` in the Zarr group attributes.
Each version is also written out, for readers in any language, as `schemas/<name>.v<N>.json`
at the top of the repository (`describe`); a test keeps the two the same.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

# 2: plan/ of parts and an index, manifest parts compacted into files of shard ranges
STORE_FORMAT_VERSION = 2
READABLE_STORE_FORMATS = (1, 2)  # 1: one plan.parquet; its manifest parts were never removed
# 2: tar members located by byte range; listing errors planned as rows
# 3: one part per listed input (plan/part-*.parquet) and an index of parts (plan/index.parquet)
PLAN_SCHEMA_VERSION = 3
MANIFEST_SCHEMA_VERSION = 1

# What a plan row tells a reader: an item of the dataset, its row (= index in every store array)
# and its shard. On disk rows and shards are not stored: a part's rows follow its index row's
# `first_row`, and the shard is row // shard_size.
ITEM_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),  # user's key, else a hash of the URI
    pa.field("uri", pa.string(), nullable=False),  # where the image is (tar/parquet items: container#member)
    pa.field("source", pa.string(), nullable=False),  # "file", "tar" or "parquet"
    pa.field("container", pa.string()),  # tar or parquet file holding the item
    pa.field("member", pa.string()),  # tar member name, or parquet row number
    pa.field("column", pa.string()),  # parquet column with the image bytes
    pa.field("duplicate_of", pa.string()),  # image_id of the first item with the same URI
    pa.field("offset", pa.int64()),  # tar member: byte offset of its data in the container
    pa.field("size", pa.int64()),  # tar member: its data's size in bytes
    pa.field("error_kind", pa.string()),  # the listing already failed for this input: container, special_file
    pa.field("error", pa.string()),
]
PLAN_PART_SCHEMA = pa.schema(ITEM_FIELDS, metadata={"schema_version": str(PLAN_SCHEMA_VERSION)})
PLAN_SCHEMA = pa.schema(
    [*ITEM_FIELDS, pa.field("shard", pa.int32(), nullable=False), pa.field("row", pa.int64(), nullable=False)],
    metadata={"schema_version": str(PLAN_SCHEMA_VERSION)},
)

# One row per listed input (a tar, a Parquet file, a range of a file list, a batch of image
# files), in plan order. The driver keeps this, never a row per image.
PLAN_INDEX_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # the part's file under plan/: {listing}/part-{n:06d}.parquet
        pa.field("input", pa.string(), nullable=False),  # the input's URI (a batch of image files: its folder)
        pa.field("kind", pa.string(), nullable=False),  # "files", "tar", "parquet" or "list"
        pa.field("first_row", pa.int64(), nullable=False),  # the part's first row; its rows follow densely
        pa.field("count", pa.int64(), nullable=False),  # items in the part
        pa.field("errors", pa.int64(), nullable=False),  # of them, inputs the listing found broken
        pa.field("start", pa.int64()),  # list: the byte range [start, stop) of the file list it holds
        pa.field("stop", pa.int64()),
        pa.field("tail", pa.string()),  # list: sha1 of the bytes just before stop (--append checks it is unchanged)
    ],
    metadata={"schema_version": str(PLAN_SCHEMA_VERSION)},
)

# One manifest row per planned item, ok or error; one Parquet part per committed shard.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error_kind", pa.string()),  # read, decode, too_large, duplicate, container, special_file, ...
        pa.field("error", pa.string()),
        pa.field("height", pa.int32()),  # original image, after EXIF orientation
        pa.field("width", pa.int32()),
        pa.field("input_height", pa.int32()),  # what the model saw
        pa.field("input_width", pa.int32()),
        # The model input shows original pixels [y0, y1) x [x0, x1), resampled to input size:
        # feature cell (i, j) at stride s covers y0 + (i*s .. (i+1)*s) * (y1 - y0) / input_height.
        pa.field("region", pa.list_(pa.float32(), 4)),
        pa.field("bucket", pa.string()),  # "HxW" sub-array of dense/L{L} (aspect policy), null if none
        pa.field("n_views", pa.int32()),
    ],
    metadata={"schema_version": str(MANIFEST_SCHEMA_VERSION)},
)


def describe(schema: pa.Schema) -> dict[str, Any]:
    """A schema as plain JSON: its version and each column's name, Arrow type and nullability."""
    return {
        "schema_version": int(schema.metadata[b"schema_version"]),
        "columns": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


PUBLISHED = {"plan_part": PLAN_PART_SCHEMA, "plan_index": PLAN_INDEX_SCHEMA, "manifest": MANIFEST_SCHEMA}  # what schemas/<name>.v<N>.json describes

