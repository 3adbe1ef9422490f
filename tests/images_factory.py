"""Image files made in the tests: the bad and awkward inputs real datasets contain."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return Image.fromarray((base * 0.7 + rng.uniform(0, 76, (height, width, 3))).astype(np.uint8))


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, with orientation 6 (rotate 90° clockwise): upright it is 20 x 40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(gradient(20, 40), "JPEG", exif=exif.tobytes())


def bad_input_files() -> dict[str, tuple[bytes, str | None, tuple[int, int] | None]]:
    """name -> (file bytes, expected error_kind or None if ok, expected upright (height, width) if ok)."""
    jpeg = encode(gradient(48, 64, seed=1), "JPEG", quality=90)
    palette = Image.fromarray(np.arange(48 * 64, dtype=np.uint8).reshape(48, 64) % 16, mode="L").convert("P")
    palette.info["transparency"] = 0
    return {
        "good.jpg": (jpeg, None, (48, 64)),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode", None),
        "empty.jpg": (b"", "empty", None),
        "text.jpg": (b"this is not an image, it is a text file\n" * 4, "decode", None),
        "cmyk.jpg": (encode(gradient(32, 40, seed=2).convert("CMYK"), "JPEG"), None, (32, 40)),
        "sixteen.png": (encode(Image.fromarray((np.arange(30 * 50).reshape(30, 50) * 40).astype(np.uint16)), "PNG"), None, (30, 50)),
        "palette.png": (encode(palette, "PNG", transparency=0), None, (48, 64)),
        "rotated.jpg": (exif_rotated_jpeg(), None, (40, 20)),
        "bomb.png": (encode(Image.new("L", (1200, 1000)), "PNG"), "too_large", None),
        "pixel.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None, (1, 1)),
        "rgba.png": (encode(Image.new("RGBA", (20, 30), (0, 0, 255, 0)), "PNG"), None, (30, 20)),
    }


BOMB_LIMIT = 1_000_000  # --max-pixels in tests: bomb.png has 1.2 M pixels


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def damaged_dataset(special_files_in: Path | None = None) -> tuple[dict[str, bytes], dict[str, str | None]]:
    """Good images beside damaged containers, and special files made in `special_files_in` if given
    (object stores have none).

    Returns (file name -> bytes to write, name of each input the listing can name -> its expected
    error_kind or None if ok); member names are 'container#member', a container's own row its name.
    """
    jpeg = {i: encode(gradient(40, 48 + 8 * i, seed=10 + i), "JPEG") for i in range(9)}
    good_tar = tar_bytes({"k0.jpg": jpeg[3], "k0.json": b"{}", "k1.jpg": jpeg[4]})
    def three(prefix: str) -> bytes:  # keys are unique across a WebDataset: a repeated key is a duplicate
        return tar_bytes({f"{prefix}{i}.jpg": jpeg[5 + i] for i in range(3)})

    with tarfile.open(fileobj=io.BytesIO(three("m"))) as archive:
        headers = [member.offset for member in archive]
    bad_first, bad_second = bytearray(three("f")), bytearray(three("m"))
    bad_first[148:156] = b"garbage!"  # the checksum field of a header block
    bad_second[headers[1] + 148 : headers[1] + 156] = b"garbage!"
    parquet = parquet_bytes(pa.table({"key": ["p0", "p1"], "image": pa.array([jpeg[8], jpeg[0]], pa.binary())}))
    files = {
        "a.jpg": jpeg[0],
        "b.jpg": jpeg[1],
        "c.jpg": jpeg[2],
        "good.tar": good_tar,
        "truncated.tar": three("t")[: headers[2] + tarfile.BLOCKSIZE + 100],  # m2's header survives, its data does not
        "bad-first-header.tar": bytes(bad_first),
        "bad-second-header.tar": bytes(bad_second),
        "good.parquet": parquet,
        "truncated.parquet": parquet[: len(parquet) // 2],
    }
    expected: dict[str, str | None] = {
        "a.jpg": None, "b.jpg": None, "c.jpg": None,
        "good.tar#k0.jpg": None, "good.tar#k1.jpg": None,
        "truncated.tar#t0.jpg": None, "truncated.tar#t1.jpg": None, "truncated.tar#t2.jpg": "read", "truncated.tar": "container",
        "bad-first-header.tar": "container",
        "bad-second-header.tar#m0.jpg": None, "bad-second-header.tar": "container",
        "good.parquet#0": None, "good.parquet#1": None,
        "truncated.parquet": "container",
    }  # fmt: skip
    if special_files_in is not None:
        folder = special_files_in
        folder.mkdir(parents=True, exist_ok=True)
        os.mkfifo(folder / "pipe.jpg")
        (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
        (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
        (folder / "linked.jpg").symlink_to(folder / "a.jpg")  # a link to a regular file is an ordinary input
        expected |= {"pipe.jpg": "special_file", "dangling.jpg": "special_file", "loop.jpg": "special_file", "linked.jpg": None}
    return files, expected


def img2dataset_output(folder: Path, output_format: str, shard: int, samples: int, *, failed: tuple[int, ...] = (), broken: tuple[int, ...] = ()) -> dict[str, bytes]:
    """One shard of img2dataset's output as img2dataset 1.47's writers lay it out (`writer.py`):
    keys '{shard:05d}{index:04d}'; webdataset: `NNNNN.tar` holding key.jpg, key.txt and key.json of
    each downloaded sample, beside `NNNNN.parquet` (the metadata of every sample, failed downloads
    included, no image bytes); files: the same members in a folder `NNNNN/`; parquet: `NNNNN.parquet` with the bytes in a `jpg` column, null for a
    failed download; both with `NNNNN_stats.json`. `broken` samples hold bytes that are no image.
    Returns key -> the image bytes the shard holds."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard:05d}"
    keys = [f"{name}{i:04d}" for i in range(samples)]
    images = {key: b"<html>not found</html>" if i in broken else encode(gradient(36 + i, 44, seed=100 * shard + i), "JPEG") for i, key in enumerate(keys) if i not in failed}
    meta = {
        "key": keys,
        "url": [f"http://images.example/{key}.jpg" for key in keys],
        "caption": [f"caption of {key}" for key in keys],
        "status": ["failed_to_download" if i in failed else "success" for i in range(samples)],
        "error_message": ["Connection refused" if i in failed else None for i in range(samples)],
        "width": [None if i in failed else 44 for i in range(samples)],
        "height": [None if i in failed else 36 + i for i in range(samples)],
        "sha256": [None if i in failed else f"{i:064x}" for i in range(samples)],
    }
    if output_format == "webdataset":
        members = {}
        for i, key in enumerate(keys):
            if key in images:
                members |= {f"{key}.jpg": images[key], f"{key}.txt": meta["caption"][i].encode(), f"{key}.json": json.dumps({k: v[i] for k, v in meta.items()}).encode()}
        (folder / f"{name}.tar").write_bytes(tar_bytes(members))
        pq.write_table(pa.table(meta), folder / f"{name}.parquet")
    elif output_format == "files":
        for i, key in enumerate(keys):
            if key in images:
                write_files(folder / name, {f"{key}.jpg": images[key], f"{key}.txt": meta["caption"][i].encode(), f"{key}.json": b"{}"})
        pq.write_table(pa.table(meta), folder / f"{name}.parquet")
    elif output_format == "parquet":
        pq.write_table(pa.table({**meta, "jpg": pa.array([images.get(key) for key in keys], pa.binary())}), folder / f"{name}.parquet")
    else:
        raise ValueError(output_format)
    stats = {"count": samples, "successes": samples - len(failed), "failed_to_download": len(failed), "status_dict": {"success": samples - len(failed)}}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return images
