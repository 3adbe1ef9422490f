"""srt-serve under load on loopback: queries per second and p50/p99 latency at 1, 8 and 32 clients.

    python -m bench.bench_serve

The service is the real command (jobs/serve.py in its own process) over two indexes:
- a flat index of 100,000 pooled descriptors (dimension 384, clustered like image descriptors) in a
  real store written by the pipeline's writers: stored-image queries (by image_id, no model);
- a flat index of the bundled photos extracted with the default flags (ViT-S/16, random-init
  weights): uploaded-image queries, each running the model on the CPU.
Stored-image queries are sent by wrk (Debian's package; `make bench` installs it), which costs
the shared cores little, for a fixed time per level; uploads by httpx (asyncio) from this process,
bounded in requests and seconds. Client and service share this machine's two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import faiss
import httpx
import numpy as np

from bench.bench_retrieval import descriptors, synthetic_store
from bench.results import SAMPLES, median_seconds, table, write_section
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import DescriptorSpec, build_index, load_index, save_index

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (1, 8, 32)
K = 10


def build_indexes(folder: Path, count: int) -> tuple[str, str]:
    """(flat index of `count` synthetic descriptors, flat index of the bundled photos)."""
    big = synthetic_store(str(folder / "synthetic.zarr"), descriptors("clustered", count, 384, np.random.default_rng(0)).astype(np.float16))
    save_index(build_index(big, DescriptorSpec("pooled")), str(folder / "synthetic.index"))
    run_local(ExtractConfig(dataset=str(SAMPLES), out=str(folder / "samples.zarr")))
    save_index(build_index(FeatureStore.open(str(folder / "samples.zarr")), DescriptorSpec("pooled")), str(folder / "samples.index"))
    return str(folder / "synthetic.index"), str(folder / "samples.index")


def blas_thresholds(index_uri: str) -> dict[int, float]:
    """Median ms of one search of 32 queries under FAISS's BLAS thresholds, side by side."""
    index = load_index(index_uri)
    queries = index.index.reconstruct_n(0, 32)
    timings = {}
    for threshold in (128000, 20, 128000, 20):  # interleaved: the machine's noise hits both
        faiss.cvar.distance_compute_blas_threshold = threshold
        timings.setdefault(threshold, []).append(median_seconds(lambda: index.search(queries, K), repeats=5) * 1000)
    faiss.cvar.distance_compute_blas_threshold = 20
    return {threshold: min(values) for threshold, values in timings.items()}


def start_service(indexes: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, str(ROOT / "jobs" / "serve.py"), *[f"--index={i}" for i in indexes], "--port", str(port)]
    with log.open("w") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"srt-serve did not start: {log.read_text()}")


WRK_SCRIPT = """
math.randomseed(1)
request = function()
  return wrk.format("GET", string.format("/api/search?index=synthetic.index&k=%d&image=img%%07d", math.random(0, %d)))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "seconds": %%f, "p50_us": %%f, "p99_us": %%f, "non_2xx": %%d, "socket_errors": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk(url: str, script: Path, clients: int, seconds: float) -> dict:
    """wrk's figures for `clients` connections over `seconds` (its last output line, JSON)."""
    done = subprocess.run(["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds:g}s", "-s", str(script), url], capture_output=True, text=True, check=True)
    m = json.loads(done.stdout.strip().splitlines()[-1])
    return {"requests": m["requests"], "qps": (m["requests"] - m["non_2xx"]) / m["seconds"], "p50": m["p50_us"] / 1000, "p99": m["p99_us"] / 1000, "statuses": {"non-2xx": m["non_2xx"], "socket errors": m["socket_errors"]}}


async def load(send, clients: int, requests: int, seconds: float) -> dict:
    """`clients` loops sending `send(client, i)` until `requests` were sent or `seconds` passed."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:

        async def one_client() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                answer = await send(client, sent)
                latencies.append(time.perf_counter() - start)
                statuses[answer.status_code] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "qps": statuses[200] / elapsed, "p50": np.percentile(ms, 50), "p99": np.percentile(ms, 99), "statuses": dict(statuses)}


def row(kind: str, clients: int, m: dict) -> list[object]:
    others = ", ".join(f"{code}: {n}" for code, n in sorted(m["statuses"].items(), key=str) if code != 200 and n) or "none"
    return [kind, clients, m["requests"], f"{m['qps']:.1f}", f"{m['p50']:.1f}", f"**{m['p99']:.1f}**" if kind.startswith("stored") else f"{m['p99']:.0f}", others]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="descriptors in the flat index of stored-image queries")
    parser.add_argument("--stored-seconds", type=float, default=15, help="duration of each level of stored-image queries")
    parser.add_argument("--upload-requests", type=int, default=64, help="uploaded-image queries per level, at most")
    parser.add_argument("--seconds", type=float, default=60, help="longest run of one level")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        parser.error("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        synthetic, samples = build_indexes(folder, args.count)
        search_ms = blas_thresholds(synthetic)
        store = FeatureStore.open(str(folder / "samples.zarr"))
        config, photos = store.config, [(SAMPLES / record["uri"].rsplit("/", 1)[-1]).read_bytes() for record in store.manifest.to_pylist() if record["status"] == "ok"]
        script = folder / "stored.lua"
        script.write_text(WRK_SCRIPT % (K, args.count - 1))
        process, url = start_service([synthetic, samples], folder / "serve.log")
        try:

            def uploaded(client: httpx.AsyncClient, i: int):
                return client.post(f"{url}/api/search", params={"index": "samples.index", "k": K}, files={"image": ("query.jpg", photos[i % len(photos)], "image/jpeg")})

            rows = []
            wrk(url, script, 8, 3)  # warm-up
            asyncio.run(load(uploaded, 1, 2, args.seconds))  # warm-up: loads the model
            for clients in CLIENTS:
                rows.append(row(f"stored image, {args.count:,} descriptors", clients, wrk(url, script, clients, args.stored_seconds)))
                print(rows[-1], flush=True)
            for clients in CLIENTS:
                rows.append(row("uploaded image (model on CPU)", clients, asyncio.run(load(uploaded, clients, args.upload_requests, args.seconds))))
                print(rows[-1], flush=True)
        finally:
            process.terminate()
            process.wait(30)
    write_section(
        "serve",
        "srt-serve: queries per second and latency on loopback",
        f"""
The real service (`jobs/serve.py` with its defaults, among them `--max-concurrent 8`) in its own
process; the clients in others, on the same two cores. Each client sends its next request when
its last is answered; top {K}. Stored-image queries (wrk, {args.stored_seconds:g} s per level) name a
random image of a flat index of {args.count:,} clustered 384-d descriptors: no model, the indexed
vector, one FAISS search for the queries that wait together. Uploaded-image queries (httpx, at
most {args.upload_requests} per level) send the bundled photos to a store of them extracted with the default
flags ({config['model']}, {config['image_size']}², {len(config['shifts'])} views): each runs the model on the CPU;
at most 8 wait for it, more are answered 503 (listed, not in the queries per second).

{table(["query", "clients", "requests", "queries/s", "p50 ms", "p99 ms", "other answers"], rows)}

One FAISS search of 32 queries on the {args.count:,} vectors, in this process, idle service:
{search_ms[128000]:.1f} ms with FAISS 1.15's default BLAS threshold (128000), {search_ms[20]:.1f} ms with 20 (the project's
setting, as in earlier FAISS releases): {search_ms[128000] / search_ms[20]:.1f}x.
""",
    )


if __name__ == "__main__":
    main()
