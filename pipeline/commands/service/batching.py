"""Requests that wait together are served together: one FAISS search for every waiting query
vector, one forward pass for every waiting uploaded image. The queue is bounded, so a burst is
answered "busy" instead of piling up behind the model."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

MAX_BATCH = 64  # requests taken into one call
GAP_SECONDS = 0.002
LINGER_SECONDS = 0.010


class Busy(Exception):
    """The queue is full: the caller answers 503."""


class Batcher:
    """Runs `handle(items) -> results` (one result per item, in order) on its own thread over
    whatever requests are waiting, at most `bound` of them."""

    def __init__(self, handle: Callable[[Sequence[Any]], Sequence[Any]], bound: int, name: str) -> None:
        self.handle = handle
        self.waiting: queue.Queue[tuple[Any, Future]] = queue.Queue(maxsize=bound)
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        try:
            self.waiting.put_nowait((item, future))
        except queue.Full:
            raise Busy(f"{self.waiting.maxsize} requests of this kind are waiting already; try again shortly") from None
        return future

    def _take(self) -> list[tuple[Any, Future]]:
        """The waiting requests, and those that keep arriving: a search costs nearly as much for
        one query as for 32 (one pass over the vectors), so waiting a little for the clients of
        the last batch to come back saves a whole pass (bench_serve)."""
        batch = [self.waiting.get()]
        closes = time.monotonic() + LINGER_SECONDS
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.waiting.get(timeout=max(0.0, min(GAP_SECONDS, closes - time.monotonic()))))
            except queue.Empty:
                break
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            try:
                results = self.handle([item for item, _ in batch])
            except Exception as error:  # the callers' futures carry it to their requests
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
