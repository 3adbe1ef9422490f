"""Whole stored objects of the store's arrays, encoded here and put in one call each.

zarr-python writes a block chunk by chunk: for each chunk its codec pipeline runs Python on its
one event-loop thread, which every writer thread of a process waits on (bench_store: about
1.9 ms of CPU per image of dense maps, most of it not compression). The store's arrays have one
fixed layout (dense maps: one image per chunk inside one Zarr shard per work shard; vectors: one
chunk per work shard), so a work shard's block is always whole stored objects. They are encoded
here instead: each chunk by numcodecs (which releases the interpreter lock), the shard index as
zarr's sharding codec lays it out (offset and length per chunk, little-endian uint64, then its
CRC32C), and each object written through fsspec chunk by chunk, never joined in memory. The bytes are zarr-python's own
(tests/test_store_objects.py compares them), so every Zarr v3 reader opens the store as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec
import google_crc32c
import numcodecs
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

MISSING = np.uint64(2**64 - 1)  # a shard index entry of a chunk that is not stored
BLOSC_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def chunk_compressor(codecs: tuple) -> numcodecs.abc.Codec | None:
    """The numcodecs codec that does what zarr's chunk codecs (bytes, then at most one compressor)
    do; ValueError for any other chain."""
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        raise ValueError(f"not a layout of this store: chunk codecs {codecs}")
    if len(codecs) == 1:
        return None
    codec = codecs[1]
    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=BLOSC_SHUFFLES[codec.shuffle.value], blocksize=codec.blocksize)
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    raise ValueError(f"not a layout of this store: compressor {codec}")


@dataclass
class ObjectWriter:
    """Writes blocks of whole stored objects (Zarr shards or chunks) of one array."""

    array: zarr.Array
    rows: int  # array rows per stored object: the work shard size
    sharded: bool
    compressor: numcodecs.abc.Codec | None
    fs: fsspec.AbstractFileSystem
    folder: str  # the array's folder on `fs`

    @classmethod
    def of(cls, array: zarr.Array, out: str, storage_options: dict[str, Any] | None = None) -> ObjectWriter:
        """The writer of `array`, an array of the store at URI `out`."""
        fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        where = {"fs": fs, "folder": f"{root.rstrip('/')}/{array.path}"}
        codecs = array.metadata.codecs
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            index = sharding.index_codecs
            if sharding.chunk_shape[0] != 1 or sharding.index_location.value != "end" or len(index) != 2 or not isinstance(index[1], Crc32cCodec):
                raise ValueError(f"not a layout of this store: {sharding}")
            return cls(array, array.metadata.chunk_grid.chunk_shape[0], True, chunk_compressor(sharding.codecs), **where)
        return cls(array, array.metadata.chunk_grid.chunk_shape[0], False, chunk_compressor(codecs), **where)

    def write(self, start: int, block: np.ndarray, rows_planned: int | None = None) -> None:
        """Store `block` as rows `start`.. of the array: every stored object it covers, whole.
        `rows_planned`: the array's rows now (default its shape when opened; it grows while a
        dataset is being listed), so only the last block may be short."""
        if start % self.rows or (len(block) != self.rows and start + len(block) != (rows_planned or self.array.shape[0])):
            raise ValueError(f"rows {start}..{start + len(block)} are not whole stored objects of {self.rows} rows")
        block = np.ascontiguousarray(block, dtype=self.array.dtype.newbyteorder("<"))
        parts = self._shard(block) if self.sharded else [self._chunk(block)]
        path = f"{self.folder}/{self.array.metadata.encode_chunk_key((start // self.rows,) + (0,) * (block.ndim - 1))}"
        if isinstance(self.fs, LocalFileSystem):  # object stores have no folders to make
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as handle:
            for part in parts:
                handle.write(part)

    def _encode(self, values: np.ndarray) -> bytes:
        return values.tobytes() if self.compressor is None else bytes(self.compressor.encode(values))

    def _chunk(self, block: np.ndarray) -> bytes:
        """One chunk of `rows` rows; the last work shard's is padded with the fill value, as zarr stores edge chunks."""
        if len(block) < self.rows:
            block = np.concatenate([block, np.zeros((self.rows - len(block), *block.shape[1:]), dtype=block.dtype)])
        return self._encode(block)

    def _shard(self, block: np.ndarray) -> list[bytes]:
        """A Zarr shard of one row per chunk, in parts: the chunks in order, then the index and its
        CRC32C. Rows past the array's end (the last work shard) have no chunk."""
        chunks = [self._encode(row) for row in block]
        lengths = np.array([len(chunk) for chunk in chunks], dtype="<u8")
        index = np.full((self.rows, 2), MISSING, dtype="<u8")
        index[: len(chunks), 0] = np.cumsum(lengths) - lengths
        index[: len(chunks), 1] = lengths
        index_bytes = index.reshape(self.rows, *(1,) * (block.ndim - 1), 2).tobytes()
        checksum = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        return [*chunks, index_bytes + checksum]
