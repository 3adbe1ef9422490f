"""Shared bench plumbing: median timing, peak-memory probes, and RESULTS.md sections."""

from __future__ import annotations

import contextlib
import platform
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SAMPLES = RESULTS.parent.parent / "data" / "samples"


def median_seconds(run: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `run` after `warmup` untimed calls; CUDA is synchronized around each call."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_delta_mb(run: Callable[[], object]) -> float:
    """Peak resident memory that `run` adds, in MB (Linux: resets VmHWM through /proc/self/clear_refs).

    Call it in a fresh process per variant: freed memory the allocator keeps would blur a second probe.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match, f"{field} not in /proc/self/status"
    return int(match.group(1))


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md, stamped with the command that made it."""
    script = Path(sys.argv[0]).resolve().relative_to(RESULTS.parent.parent).with_suffix("")
    command = " ".join(["python -m", ".".join(script.parts), *sys.argv[1:]])
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\nReproduce: `{command}`  \nMachine: {machine()}\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is rewritten by the bench that produced it.\n"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    print(block)


@contextlib.contextmanager
def loopback_s3(bucket: str, requests: list[tuple[str, str]] | None = None) -> Iterator[dict]:
    """moto's S3-compatible server on loopback with one bucket; yields s3fs storage options.
    The benches and the tests' `s3_server` fixture share it. `requests`: a list the server appends
    each request it answers to, as (method, path), counted where they arrive whatever the client."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket=bucket)
    if requests is not None:
        answer = server._server.app  # moto keeps its WSGI server private; a wrapper sees every request

        def logged(environ: dict, start_response: Callable) -> object:
            requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
            return answer(environ, start_response)

        server._server.app = logged
    try:
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        server.stop()


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def imagenet_like(count: int, seed: int = 0, width: int = 500, height: int = 375) -> list[bytes]:
    """JPEGs of about 500 x 375 and 100 KB by default: smooth gradients under noise, as photos compress."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        base = np.linspace(0, 1, width)[None, :, None] * rng.uniform(60, 200, 3) + np.linspace(0, 1, height)[:, None, None] * rng.uniform(0, 60, 3)
        pixels = (base + rng.normal(0, 18, (height, width, 3))).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def sample_photos(copies: int) -> list[bytes]:
    """The bundled photos and `copies` re-encoded crops of each: distinct content, real statistics."""
    import io

    from PIL import Image

    out = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        out.append(path.read_bytes())
        width, height = image.size
        for k in range(copies):
            box = (k * width // (4 * copies), k * height // (4 * copies), width - k * width // (5 * copies), height - k * height // (5 * copies))
            buffer = io.BytesIO()
            image.crop(box).save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out
