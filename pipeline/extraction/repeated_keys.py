"""Keys (image_ids) that more than one input of a listing gives, found at any scale in fixed memory.

Within an input, a repeated key becomes a `duplicate` error row at listing (`listing._marked`).
Across inputs keys are the user's and stay as given: both rows are extracted, since the plan's
shards are computed while later inputs are still being listed, before the second copy is known.
They are reported instead (log and summary.json), so a dataset planned twice (an img2dataset
folder whose metadata was once read as file lists) is seen at once.

How, at a billion keys: each listing task hashes its keys to 64 bits (`key_hashes`); the driver
passes them through a Bloom filter of fixed size (`BLOOM_BITS`), which flags every key seen
before and a few that were not. Only when it flags any does a second pass read the plan parts'
image_id columns again (on the same mapper) and count the flagged hashes exactly, so the report
names no false duplicate. A dataset without repeats costs one hash per key and 32 MiB.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.plan import plan_dir

BLOOM_BITS = 1 << 28  # 32 MiB: under 1e-4 false candidates per key up to about 20M keys, and exact anyway
BLOOM_HASHES = 4
MAX_CANDIDATES = 1_000_000  # flagged hashes kept for the exact count (bounds the driver past ~300M keys)
EXAMPLES = 5

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


def key_hashes(items: pa.Table) -> np.ndarray:
    """64-bit hashes of the keys of a part's usable rows (not the listing's error rows: their ids
    are derived from the URI, and within-input duplicates already carry a unique id)."""
    return _hashes(_usable(items).column("image_id").to_pylist())


def _usable(items: pa.Table) -> pa.Table:
    """A part's rows that are images to read: no listing error, no duplicate within the input."""
    return items.filter(pc.and_(pc.is_null(items.column("error_kind")), pc.is_null(items.column("duplicate_of"))))


def _hashes(keys: list[str]) -> np.ndarray:
    digests = b"".join(hashlib.blake2b(key.encode(), digest_size=8).digest() for key in keys)
    return np.frombuffer(digests, dtype=np.uint64)


@dataclass
class RepeatedKeys:
    """The driver's side: the filter, the flagged hashes, and the exact report once confirmed."""

    bits: np.ndarray = field(default_factory=lambda: np.zeros(BLOOM_BITS // 8, np.uint8))
    candidates: set[int] = field(default_factory=set)
    overflow: bool = False  # more flagged hashes than MAX_CANDIDATES: the report is a lower bound

    def add(self, hashes: np.ndarray) -> None:
        """One input's key hashes (unique within it): flag those whose every bit is already set."""
        if not len(hashes):
            return
        low, high = hashes & np.uint64(0xFFFFFFFF), hashes >> np.uint64(32)
        positions = np.stack([(low + np.uint64(i) * high) % np.uint64(BLOOM_BITS) for i in range(BLOOM_HASHES)])
        byte, bit = positions >> np.uint64(3), (positions & np.uint64(7)).astype(np.uint8)
        seen = ((self.bits[byte] >> bit) & 1).all(axis=0)
        np.bitwise_or.at(self.bits, byte.ravel(), (np.uint8(1) << bit).ravel())
        flagged = hashes[seen]
        room = MAX_CANDIDATES - len(self.candidates)
        if len(flagged) > room:
            self.overflow = True
            flagged = flagged[:room]
        self.candidates.update(int(h) for h in flagged)

    def confirm(self, out: str, parts: list[str], storage_options: dict[str, Any], mapper: Mapper) -> dict[str, Any] | None:
        """The exact report (None when no key repeats): how many keys more than one input gives,
        the rows beyond their first, and the first few with their inputs' URIs."""
        if not self.candidates:
            return None
        found: dict[str, list[str]] = defaultdict(list)
        wanted = frozenset(self.candidates)
        for matches in mapper(functools.partial(_matches, out, storage_options, wanted), parts):
            for key, uri in matches:
                found[key].append(uri)
        repeated = {key: uris for key, uris in found.items() if len(uris) > 1}
        if not repeated:
            return None
        examples = [{"image_id": key, "uris": uris[:3]} for key, uris in list(repeated.items())[:EXAMPLES]]
        return {"keys": len(repeated), "rows": sum(len(uris) - 1 for uris in repeated.values()), "lower_bound": self.overflow, "examples": examples}


def _matches(out: str, storage_options: dict[str, Any], wanted: frozenset[int], path: str) -> list[tuple[str, str]]:
    """(key, uri) of a part's usable rows whose key hash is flagged; runs wherever the mapper sends it."""
    with fsspec.open(f"{plan_dir(out)}/{path}", "rb", **storage_options) as handle:
        items = pq.read_table(handle, columns=["image_id", "uri", "error_kind", "duplicate_of"])
    usable = _usable(items)
    keys = usable.column("image_id").to_pylist()
    hit = np.isin(_hashes(keys), np.fromiter(wanted, np.uint64, len(wanted)))
    uris = usable.column("uri").to_pylist()
    return [(keys[i], uris[i]) for i in np.flatnonzero(hit)]


def describe(report: dict[str, Any]) -> str:
    """One log line of a report."""
    first = "; ".join(f"{e['image_id']} ({', '.join(e['uris'][:2])})" for e in report["examples"][:3])
    bound = "at least " if report["lower_bound"] else ""
    return (
        f"{bound}{report['keys']} image_ids are given by more than one input ({report['rows']} rows beyond the first; "
        f"all extracted, see summary.json 'plan'): {first}"
    )
