"""What the benches measure a job with, besides the clock: CPU time by thread group (/proc), the
interpreter lock (py-spy), and the moment a job's start-up is over (its first shard load).

Each is a context manager around a job run in this process (`run_local`)."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.extraction.worker import ShardWorker

THREAD_GROUPS = (("decode", "decode"), ("commit", "store writers"), ("zarr_io", "zarr event loop"), ("MainThread", "main"), ("produce", "prefetch (read)"))


class ThreadCPU:
    """CPU seconds of this process's threads by group (decode pool, store writers, zarr's event
    loop, main, the reading prefetch thread, the rest: torch's and blosc's own threads), sampled
    from /proc every 100 ms while it runs, so threads that end before it stops still count."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> ThreadCPU:
        self.mark()
        self._sampler.start()
        return self

    def mark(self) -> None:
        """Count from now on."""
        self.start = self._sample()

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sampler.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def _sample(self) -> dict[int, float]:
        tick = os.sysconf("SC_CLK_TCK")
        for thread in threading.enumerate():
            self.names.setdefault(thread.native_id, thread.name)
        now = {}
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                now[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        for tid, seconds in now.items():
            self.seconds[tid] = max(self.seconds.get(tid, 0.0), seconds)
        return now

    def by_group(self) -> tuple[dict[str, float], dict[str, float], float]:
        """(CPU seconds by group, CPU seconds of each group's busiest thread, the sampling's own CPU
        seconds, to take out of the process's)."""
        groups: dict[str, float] = collections.defaultdict(float)
        busiest: dict[str, float] = collections.defaultdict(float)
        sampler = 0.0
        for tid, seconds in self.seconds.items():
            used = seconds - self.start.get(tid, 0.0)
            name = self.names.get(tid, "")
            if name == "cpu-sampler":
                sampler = used
                continue
            group = next((label for marker, label in THREAD_GROUPS if marker in name), "other (torch, blosc, Ray)")
            groups[group] += used
            busiest[group] = max(busiest[group], used)
        return dict(groups), dict(busiest), sampler


LOCK_RATE = 500  # py-spy samples a second


class LockSampler:
    """The seconds some thread of this process holds the interpreter lock, sampled by py-spy
    (`record --gil`, which records a sample only where a thread holds it; Ray's default extra
    installs py-spy). One process runs no faster than 1 / (lock seconds per image), however many
    cores it has. Sampling starts once py-spy says it does (about 80 ms after it starts)."""

    def __enter__(self) -> LockSampler:
        executable = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if executable is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy (Ray's default extra has it)")
        command = [executable, "record", "--gil", "--nonblocking", "--rate", str(LOCK_RATE), "--format", "raw", "-o", os.devnull, "--pid", str(os.getpid())]
        self._spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        said = []
        for line in self._spy.stdout:
            said.append(line)
            if "Sampling process" in line:
                return self
        raise RuntimeError(f"py-spy did not start sampling: {''.join(said)}")

    def __exit__(self, *_: object) -> None:
        self._spy.send_signal(signal.SIGINT)
        said = self._spy.communicate()[0]
        samples = re.search(r"Samples: (\d+)", said)
        if samples is None:
            raise RuntimeError(f"py-spy wrote no samples: {said}")
        self.seconds = int(samples[1]) / LOCK_RATE


def lock_sampling_problem() -> str | None:
    """Why py-spy cannot sample this process (not installed, or no permission to read its memory:
    a container without CAP_SYS_PTRACE), or None where it can."""
    try:
        with LockSampler():
            time.sleep(0.2)  # py-spy takes Ctrl-C as "stop and report" only once it is sampling
    except RuntimeError as error:
        return str(error)
    return None


@contextlib.contextmanager
def on_first_load(start: Callable[[], object]) -> Iterator[None]:
    """Calls `start` once, as the job's first shard load begins: planning and start-up are over."""
    original, started = ShardWorker.load, []

    def load(self: ShardWorker, shard: int) -> object:
        if not started:
            started.append(start())
        return original(self, shard)

    ShardWorker.load = load
    try:
        yield
    finally:
        ShardWorker.load = original


class LockReading:
    """The seconds some thread held the interpreter lock during a job, once `lock_sampled` ends
    (None where it did not sample)."""

    seconds: float | None = None

    def ms_per(self, images: int) -> float | None:
        return None if self.seconds is None else 1000 * self.seconds / images


@contextlib.contextmanager
def lock_sampled(enabled: bool = True) -> Iterator[LockReading]:
    """py-spy samples the interpreter lock from the job's first shard load until the block ends
    (`LockSampler`); nothing is sampled where not `enabled`."""
    reading, samplers = LockReading(), []
    with contextlib.ExitStack() as sampling:
        if enabled:
            sampling.enter_context(on_first_load(lambda: samplers.append(sampling.enter_context(LockSampler()))))
        yield reading
    if samplers:
        reading.seconds = samplers[0].seconds
