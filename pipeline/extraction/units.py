"""The Ray runner's units of work and what it keeps of them: a unit (a whole shard, one shift batch
of a shard, or a split shard's commit), the finished ones as a byte per unit of the plan, the
running ones with their actor and refs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Unit:
    """One schedulable piece of work; `batch` is None for a whole shard, "commit" for a split commit."""

    shard: int
    batch: int | str | None = None
    attempt: int = 0
    not_before: float = 0.0
    payloads: list[Any] = field(default_factory=list)  # commit units: the batches' payload refs

    @property
    def key(self) -> tuple[int, int | str | None]:
        return (self.shard, self.batch)


class UnitFlags:
    """Which units are finished, as a byte per unit of the plan (shard x shift batch, and the split
    commit), so the scheduler's state stays a few bytes per shard however many are done."""

    def __init__(self, shards: int, batches: int) -> None:
        self.columns = batches + 1 if batches > 1 else 1  # data parallel: one unit per shard
        self.flags = np.zeros((shards, self.columns), bool)

    def grow(self, shards: int) -> None:
        """Room for the shards the listing planned since."""
        self.flags = grown(self.flags, shards)

    def _at(self, key: tuple[int, int | str | None]) -> tuple[int, int]:
        shard, batch = key
        return shard, 0 if batch is None else self.columns - 1 if batch == "commit" else int(batch)

    def __contains__(self, key: tuple[int, int | str | None]) -> bool:
        return bool(self.flags[self._at(key)])

    def add(self, key: tuple[int, int | str | None]) -> None:
        self.flags[self._at(key)] = True

    def discard(self, key: tuple[int, int | str | None]) -> None:
        self.flags[self._at(key)] = False


@dataclass
class Running:
    unit: Unit
    actor: Any
    ref: Any  # the small result to wait on
    payload: Any = None  # split compute: the big result, left in the object store
    started: float = field(default_factory=time.monotonic)


def grown(flags: np.ndarray, rows: int) -> np.ndarray:
    """`flags` with False rows added up to `rows` (the plan grew while its listing went on)."""
    return flags if len(flags) >= rows else np.concatenate([flags, np.zeros((rows - len(flags), *flags.shape[1:]), flags.dtype)])
