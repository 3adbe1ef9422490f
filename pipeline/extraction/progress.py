"""Progress of an extraction: the bar (images as each image group is computed, views per second,
errors) and, on Ray, the counter actors report image groups to.

A progress report never fails a unit or a job: a counter that is gone costs the bar its moves
within shards, never an image.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from pipeline.extraction.worker import Progress


DESCRIPTIONS = {False: "extract", True: "extract (listing more)"}  # while the dataset is listed, the total grows
LOGGED_EVERY_SECONDS = 30.0  # a bar that is not on a terminal writes a line this often


class Lines:
    """Where a progress bar writes when stderr is not a terminal (a log file, CI, `ray job logs`):
    each refresh becomes a line of its own, never carriage returns piling up into one long line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar: live on a terminal; elsewhere a line every LOGGED_EVERY_SECONDS (and at the end)."""
    if sys.stderr.isatty():
        return tqdm(dynamic_ncols=True, mininterval=1.0, **options)
    return tqdm(file=Lines(sys.stderr), ncols=100, mininterval=LOGGED_EVERY_SECONDS, ascii=True, **options)


class JobProgress:
    """The job's progress bar: images as each image group is computed (shares of an image while a
    shard's shifts are split across actors; error rows when their shard is done), every image of
    the run counted once, with views computed per second and the errors committed so far."""

    def __init__(self, total: int, listing: bool = False) -> None:
        # images per second, never tqdm's seconds per image below one a second (a CPU run's first shards)
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
        self.bar = progress_bar(total=total, unit="img", desc=DESCRIPTIONS[listing], bar_format=bar_format)
        self.views = 0
        self.errors = 0

    def planned(self, images: int, listing: bool) -> None:
        """`images` more to do: the dataset's listing planned them while the run went on (`listing`: it goes on)."""
        self.bar.total += images
        self.bar.set_description(DESCRIPTIONS[listing], refresh=False)
        self.bar.refresh()

    def computed(self, images: float, views: int) -> None:
        self.views += views
        self.advance(images)

    def advance(self, images: float) -> None:
        """`images` more done. Shares of an image (split shifts) add up to whole images only up to
        float rounding: the bar stops at its total, not a hair past it (tqdm would warn)."""
        self.bar.update(min(images, self.bar.total - self.bar.n))
        self._postfix()

    def finished(self, views: int) -> None:
        """The run is over: its views as the committed shards counted them (reports still on their
        way from actors would be missing), so the bar's last rate agrees with the summary's."""
        self.views = views
        self._postfix()
        self.bar.refresh()

    def count_errors(self, errors: int) -> None:
        """The error rows committed so far."""
        self.errors = errors
        self._postfix()

    def _postfix(self) -> None:
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix(views_per_s=f"{self.views / elapsed:.1f}", errors=self.errors, refresh=False)

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.bar.close()


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Images and views computed per shard, added by actors after each image group and taken by
    the driver about twice a second, so the progress bar moves within shards."""

    def __init__(self) -> None:
        self.counts: dict[int, list[float]] = {}

    def add(self, shard: int, images: float, views: int) -> None:
        counts = self.counts.setdefault(shard, [0.0, 0])
        counts[0] += images
        counts[1] += views

    def take(self) -> dict[int, list[float]]:
        counts, self.counts = self.counts, {}
        return counts


COUNTER_PREFIX = "srt-progress"


def progress_counter(run_id: str) -> Any:
    """A ProgressCounter on the driver's own node: losing a worker node never takes it along."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressCounter.options(name=f"{COUNTER_PREFIX}-{run_id}", scheduling_strategy=here).remote()


def report_to(counter: Any, shard: int) -> Progress | None:
    """The progress callback of a unit: reports to the counter, and never fails the unit."""
    if counter is None:
        return None

    def report(images: float, views: int) -> None:
        try:
            counter.add.remote(shard, images, views)
        except RayError:  # the counter is gone: the driver says so once, the work goes on
            pass

    return report
