"""The driver at internet scale: planning, resuming and driving a job whose dataset has millions of
items, with no image ever decoded (listing reads names and tar headers only; driving uses actors
that answer at once), so what is measured is the driver.

    python -m bench.bench_scale [--uris 1000000,10000000] [--tars 1000,5000] [--s3-tars 100]
    python -m bench.bench_scale --only first-commit [--first-commit 1000000,4000000] [--baseline DIR]

- file lists of 1M and 10M `s3://` URIs (never fetched): planning time per item and the driver's
  peak memory, each size in a fresh process (`run_local`'s planning: the inputs listed on the
  driver's own threads, the worst case; on Ray they are listed by tasks elsewhere);
- 1,000 and 5,000 WebDataset tars of 1,000 tiny members each (local; hard links of one tar, so
  the disk holds one): the same figures;
- resume of the 10M-item store with every shard committed (manifest range files as a run leaves
  them): the whole rerun, start to summary, in a fresh process;
- the driver's CPU per shard over the first 20,000 pending shards of the 1M and 10M stores (the
  Ray scheduler, `bench_driver`'s instant actors);
- 100 such tars on moto's S3: requests per tar at listing, counted by the server;
- the time from start to the first committed shard of a real job (`--local` and Ray) on file lists
  of 1M and 4M local paths (64 photos, then files that are not there), each in a fresh process
  stopped at that commit: the first result must not wait for the whole listing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.results import loopback_s3, table, write_section

MEMBERS = 1000  # per tar
DRIVEN_SHARDS = 20_000  # pending shards the scheduler is timed over
BASE_FLAGS = {"model": "vit_small_patch16_224", "image_size": 224, "stride": 8, "outputs": ("cls", "pooled")}


def status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":"))) / 1024


# ---------------------------------------------------------------------------- children (fresh processes)


def planned_whole(job: Any) -> Any:
    """The job with its whole dataset planned at once (a run plans the rest as its shards are computed)."""
    if job.listing is not None:
        job.started()
        while not job.listing.done:
            job.unplanned += job.listing.take(None)
        job.pending = np.concatenate([job.pending, job.extend(0.0)])
    return job


def child_plan(dataset: str, out: str) -> dict[str, Any]:
    """Plan a new store in this fresh process: seconds, items, peak memory before and after."""
    from pipeline.extraction.config import ExtractConfig
    from pipeline.extraction.runner import plan_job, preflight

    config = ExtractConfig(dataset=dataset, out=out, **BASE_FLAGS)
    resolved = preflight(config)  # imports and model facts, before the clock and the memory mark
    before = status_mb("VmHWM")
    started = time.perf_counter()
    job = planned_whole(plan_job(resolved))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "items": job.index.items, "shards": job.shards, "parts": len(job.index.table), "peak_before_mb": before, "peak_mb": status_mb("VmHWM")}


def child_resume(dataset: str, out: str) -> dict[str, Any]:
    """A rerun of a store whose every shard is committed: from start to summary, as a user runs it."""
    from pipeline.extraction.config import ExtractConfig
    from pipeline.extraction.runner import run_local

    started = time.perf_counter()
    summary = run_local(ExtractConfig(dataset=dataset, out=out, **BASE_FLAGS))
    return {"seconds": time.perf_counter() - started, "skipped": summary.shards_skipped, "peak_mb": status_mb("VmHWM")}


def child_drive(dataset: str, out: str) -> dict[str, Any]:
    """The scheduler over the store's first DRIVEN_SHARDS pending shards, with instant actors."""
    import ray

    from bench.bench_driver import InstantActor, driver_cpu_per_unit
    from pipeline.extraction.config import ExtractConfig
    from pipeline.extraction.runner import plan_job, preflight

    job = planned_whole(plan_job(preflight(ExtractConfig(dataset=dataset, out=out, **BASE_FLAGS))))
    job.pending = job.pending[:DRIVEN_SHARDS]
    ray.init(include_dashboard=False, log_to_driver=False)
    actors = [(f"instant-{i}", InstantActor.remote()) for i in range(2)]
    cpu, wall = driver_cpu_per_unit(job, actors)
    ray.shutdown()
    return {"cpu_us": cpu, "wall_us": wall, "peak_mb": status_mb("VmHWM")}


FIRST_COMMIT_FLAGS = {"model": "vit_tiny_patch16_224", "image_size": 32, "radius": 1, "outputs": ("cls", "pooled"), "shard_size": 32}
PHOTOS = 64  # the file list's first lines: real photos (the first shards have work to do)


def child_first_commit(dataset: str, out: str, runner: str) -> dict[str, Any]:
    """A real job on the dataset, from start until its first shard is committed (then this
    process ends, its job with it): seconds, and the peak memory by then."""
    from pipeline.extraction.config import ExtractConfig
    from pipeline.extraction.distributed import run_ray
    from pipeline.extraction.runner import run_local

    config = ExtractConfig(dataset=dataset, out=out, **FIRST_COMMIT_FLAGS, **({"num_actors": 1} if runner == "ray" else {}))
    started = time.perf_counter()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            (run_ray if runner == "ray" else run_local)(config)
        except BaseException as error:  # noqa: BLE001 - reported by the waiting thread
            failed.append(error)

    job = threading.Thread(target=run, daemon=True)
    job.start()
    manifest = Path(out) / "manifest"
    while not (manifest.is_dir() and any(manifest.glob("*.parquet"))):
        if not job.is_alive():
            raise RuntimeError(f"the job ended before any commit: {failed}")
        time.sleep(0.02)
    return {"seconds": time.perf_counter() - started, "peak_mb": status_mb("VmHWM")}


CHILDREN = {
    "plan": child_plan, "resume": child_resume, "drive": child_drive,
    "first-local": lambda dataset, out: child_first_commit(dataset, out, "local"),
    "first-ray": lambda dataset, out: child_first_commit(dataset, out, "ray"),
}  # fmt: skip


def in_child(kind: str, dataset: str, out: str, pipeline_from: str | None = None) -> dict[str, Any]:
    """A child's figures; it runs in a session of its own, ended whole afterwards (Ray's processes
    too). `pipeline_from`: a folder holding another version's `pipeline/`, imported instead."""
    command = [sys.executable, "-m", "bench.bench_scale", "--child", kind, dataset, out]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pipeline_from, str(Path(__file__).resolve().parent.parent)]))}
    here = pipeline_from or Path(__file__).resolve().parent.parent  # `python -m` imports from its working directory first
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=here, start_new_session=True, env=env)
    try:
        stdout, stderr = child.communicate()
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if child.returncode:
        raise RuntimeError(f"{kind} of {dataset} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- datasets


def write_photo_list(path: Path, count: int) -> None:
    """`count` local paths: PHOTOS links to one photo, then paths of files that are not there (read errors)."""
    folder = path.parent / f"{path.stem}-photos"
    folder.mkdir()
    photo = Path(__file__).resolve().parent.parent / "data" / "samples" / "coffee.jpg"
    for i in range(PHOTOS):
        shutil.copyfile(photo, folder / f"{i:09d}.jpg")
    with path.open("w") as handle:
        for start in range(0, count, 100_000):
            handle.write("".join(f"{folder}/{i:09d}.jpg\n" for i in range(start, min(count, start + 100_000))))


def write_file_list(path: Path, count: int) -> None:
    with path.open("w") as handle:
        for start in range(0, count, 100_000):
            handle.write("".join(f"s3://laion-bench/images/{i:09d}.jpg\n" for i in range(start, min(count, start + 100_000))))


def tar_bytes() -> bytes:
    """A WebDataset tar of MEMBERS samples: a tiny image and its caption each."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for i in range(MEMBERS):
            for suffix, payload in ((".jpg", bytes([i % 256]) * 64), (".txt", b"a caption")):
                info = tarfile.TarInfo(f"{i:09d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def write_tars(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    first = folder / f"{0:06d}.tar"
    first.write_bytes(tar_bytes())
    for n in range(1, count):
        os.link(first, folder / f"{n:06d}.tar")


def commit_everything(out: str, shard_size: int) -> None:
    """Manifest range files covering every planned shard, as a finished run leaves them."""
    from pipeline.store.manifest import GROUP_SHARDS, parquet_bytes, put_atomically, range_uri
    from pipeline.store.plan import read_index
    from pipeline.store.schemas import MANIFEST_SCHEMA

    index = read_index(out, shard_size)
    for first in range(0, index.shards, GROUP_SHARDS):
        last = min(index.shards, first + GROUP_SHARDS) - 1
        rows = np.arange(first * shard_size, min(index.size, (last + 1) * shard_size))
        ids = pa.array([f"{r:09d}" for r in rows])
        columns = {"image_id": ids, "uri": ids, "shard": pa.array(rows // shard_size, pa.int32()), "row": pa.array(rows), "status": pa.array(["ok"] * len(rows))}
        table = pa.table({f.name: columns.get(f.name, pa.nulls(len(rows), f.type)) for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
        put_atomically(range_uri(out, first, last), parquet_bytes(table))


def s3_requests_per_tar(count: int) -> tuple[float, int]:
    """(requests per tar listing `count` tars in a folder, requests listing one tar alone) on moto's S3."""
    from pipeline.extraction.listing import dataset_inputs, list_input

    requests: list[tuple[str, str]] = []
    with loopback_s3("bench", requests) as options:
        import fsspec

        fs = fsspec.filesystem("s3", **options)
        data = tar_bytes()
        for n in range(count):
            fs.pipe(f"bench/tars/{n:06d}.tar", data)
        fs.invalidate_cache()
        del requests[:]
        items = sum(len(list_input(unit, options)) for unit in dataset_inputs("s3://bench/tars", options))
        assert items == count * MEMBERS, items
        folder = len(requests) / count
        fs.invalidate_cache()  # the folder's listing knows the tar's size: start from nothing
        del requests[:]
        assert sum(len(list_input(unit, options)) for unit in dataset_inputs("s3://bench/tars/000000.tar", options)) == MEMBERS
        return folder, len(requests)


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uris", default="1000000,10000000")
    parser.add_argument("--tars", default="1000,5000")
    parser.add_argument("--s3-tars", type=int, default=100)
    parser.add_argument("--first-commit", default="1000000,4000000", help="file list sizes timed to their first commit")
    parser.add_argument("--only", choices=("first-commit",), help="run one part of the bench")
    parser.add_argument("--baseline", help="a folder holding an earlier version's pipeline/ (git archive REV pipeline | tar -x -C DIR), timed to the first commit side by side")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DATASET", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, dataset, out = args.child
        print(json.dumps(CHILDREN[kind](dataset, out)), flush=True)
        os._exit(0)  # a first-commit child's job is still running: end here, without waiting for it
    first_commits([int(n) for n in args.first_commit.split(",")], args.baseline)
    if args.only:
        return

    uris, tars = [int(n) for n in args.uris.split(",")], [int(n) for n in args.tars.split(",")]
    plans, drives = [], {}
    resume: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as root:
        for count in uris:
            listing = Path(root) / f"list-{count}.txt"
            write_file_list(listing, count)
            out = f"{root}/list-{count}.zarr"
            plans.append(("file list", count, in_child("plan", str(listing), out)))
            print(plans[-1])
            drives[count] = in_child("drive", str(listing), out)
            print("drive", count, drives[count])
            if count == max(uris):
                commit_everything(out, 32)
                resume = {"items": count, **in_child("resume", str(listing), out)}
                print("resume", resume)
        for count in tars:
            folder = Path(root) / f"tars-{count}"
            write_tars(folder, count)
            plans.append(("tars", count * MEMBERS, {**in_child("plan", str(folder), f"{root}/tars-{count}.zarr"), "tars": count}))
            print(plans[-1])
    per_tar, single = s3_requests_per_tar(args.s3_tars)
    print("requests per tar", per_tar, "single tar", single)
    write_results(plans, drives, resume, per_tar, single, args.s3_tars)


def first_commits(counts: list[int], baseline: str | None) -> None:
    """Seconds from start to the first committed shard, per file list size and runner (and with
    an earlier version's pipeline, side by side)."""
    figures: dict[tuple[str, int], dict[str, Any]] = {}
    versions = {"": None, **({" (baseline)": baseline} if baseline else {})}
    with tempfile.TemporaryDirectory(prefix="bench-first-") as root:
        for count in counts:
            listing = Path(root) / f"photos-{count}.txt"
            write_photo_list(listing, count)
            for version, pipeline_from in versions.items():
                for runner in ("local", "ray"):
                    key = (runner + version, count)
                    figures[key] = in_child(f"first-{runner}", str(listing), f"{root}/{runner}{version.strip(' ()')}-{count}.zarr", pipeline_from)
                    print("first commit", key, figures[key])
    low, high = min(counts), max(counts)
    rows = [
        [runner, f"{count:,}", f"{figures[runner, count]['seconds']:.1f}", f"**{figures[runner, count]['seconds'] / figures[runner, low]['seconds']:.2f}**", f"{figures[runner, count]['peak_mb']:.0f}"]
        for runner in sorted({r for r, _ in figures}) for count in counts
    ]  # fmt: skip
    body = f"""
A real job (ViT-Ti/16 at 32², 9 views, `--outputs cls,pooled`, shards of 32) on a file list whose
first {PHOTOS} lines are photos and the rest paths of files that are not there, from the job's start
(after the imports) until its first shard is committed; each in a fresh process, ended there. The
driver lists the first input itself (no worker process to start) until a whole shard is planned;
the rest is listed in the background once that shard is done, so the first result waits for
neither the whole plan nor a listing competing with the model's start. "(baseline)" rows: the
same children importing `--baseline`'s pipeline, the version before this change, which lists
everything first (`git archive 6e8edf1 pipeline | tar -x -C /tmp/baseline`), in the same run.

{table(["runner", "URIs", "s to the first commit", f"vs {low:,}", "peak MB by then"], rows)}

Target: the first commit at {high:,} within 1.5× of that at {low:,}, with `--local` and on Ray.
"""
    write_section("scale-first-commit", "The first result of a large plan", body)


def write_results(plans: list, drives: dict, resume: dict, per_tar: float, single: int, s3_tars: int) -> None:
    rows = []
    firsts: dict[str, dict] = {}
    for source, items, figures in plans:
        first = firsts.setdefault(source, {**figures, "items": items})
        per_item = 1e6 * figures["seconds"] / items
        first_per_item = 1e6 * first["seconds"] / first["items"]
        rows.append([
            source + (f" ({figures['tars']:,} tars)" if "tars" in figures else ""), f"{items:,}", f"{figures['parts']:,}", f"{figures['seconds']:.1f}",
            f"{per_item:.2f}", f"**{per_item / first_per_item:.2f}**", f"{figures['peak_mb']:.0f}", f"**{figures['peak_mb'] / first['peak_mb']:.2f}**",
            f"{figures['peak_mb'] - figures['peak_before_mb']:+.0f}",
        ])  # fmt: skip
    drive_rows = [[f"{count:,}", f"{d['cpu_us']:.0f}", f"{d['wall_us']:.0f}", f"**{d['cpu_us'] / drives[min(drives)]['cpu_us']:.2f}**"] for count, d in sorted(drives.items())]
    body = f"""
The driver with no image decoded: listing reads names and tar headers only, driving uses actors
that answer at once. Each figure comes from a fresh process. "peak MB" is the whole driver
process's peak resident memory (VmHWM: Python, torch, timm, pyarrow included); "of which planning"
is what planning added to the peak the process had reached before it. Planning here is `run_local`'s:
inputs listed on the driver's own threads (on Ray, tasks list them elsewhere and the driver only
numbers the parts).

| dataset | items | plan parts | planning s | µs per item | per item vs the first | peak MB | peak vs the first | of which planning, MB |
|---|---|---|---|---|---|---|---|---|
{chr(10).join("| " + " | ".join(r) + " |" for r in rows)}

Targets: peak at 10M ≤ 1.2× that at 1M and ≤ 1 GB; planning time per item at 10M within 1.2× of
that at 1M.

Resume of the {resume.get('items', 0):,}-item store with every shard committed (manifest range files as a
finished run leaves them), the whole rerun from start to summary: **{resume.get('seconds', 0):.1f} s**
(target ≤ 10 s), {resume.get('skipped', 0):,} shards found committed, peak {resume.get('peak_mb', 0):.0f} MB.

The driver's CPU per shard, the Ray scheduler over the first {DRIVEN_SHARDS:,} pending shards of each
file-list store (2 instant actors; pending units made as actors have room, the manifest's range
files kept by the compactor):

{table(["store items", "driver CPU µs per shard", "wall µs per shard", "CPU vs the first"], drive_rows)}

Listing {s3_tars} tars of {MEMBERS:,} members (a tiny image and a caption each) in one folder on moto's
S3, requests counted by the server: **{per_tar:.2f} requests per tar** (the folder's listing, then one
read of each tar's headers; sizes come from the listing). One such tar given alone as --dataset:
**{single} requests** (a HEAD for its size, s3fs's own HEAD for its ETag at the first read, then its
headers in one read; target ≤ 3).
"""
    write_section("scale", "The driver at scale: planning, resume and driving millions of items", body)


if __name__ == "__main__":
    main()
