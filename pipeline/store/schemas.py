"""Versioned schemas of what the pipeline writes: the plan, the manifest, the store layout.

Bump a version when a reader of the old layout would misread the new one. Readers check
`schema_version` in the Parquet metadata and `store_format` in the Zarr group attributes.
Each version is also written out, for readers in any language, as `schemas/<name>.v<N>.json`
at the top of the repository (`describe`); a test keeps the two the same.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

STORE_FORMAT_VERSION = 1
PLAN_SCHEMA_VERSION = 2  # 2: tar members located by byte range; listing errors planned as rows
MANIFEST_SCHEMA_VERSION = 1

# The work plan: every dataset item in a stable order, cut into shards. Written once per output.
PLAN_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # user's key, else a hash of the URI
        pa.field("uri", pa.string(), nullable=False),  # where the image is (tar/parquet items: container#member)
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),  # position in the plan = index in every store array
        pa.field("source", pa.string(), nullable=False),  # "file", "tar" or "parquet"
        pa.field("container", pa.string()),  # tar or parquet file holding the item
        pa.field("member", pa.string()),  # tar member name, or parquet row number
        pa.field("column", pa.string()),  # parquet column with the image bytes
        pa.field("duplicate_of", pa.string()),  # image_id of the first item with the same URI
        pa.field("offset", pa.int64()),  # tar member: byte offset of its data in the container
        pa.field("size", pa.int64()),  # tar member: its data's size in bytes
        pa.field("error_kind", pa.string()),  # the listing already failed for this input: container, special_file
        pa.field("error", pa.string()),
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


PUBLISHED = {"plan": PLAN_SCHEMA, "manifest": MANIFEST_SCHEMA}  # what schemas/<name>.v<N>.json describes

