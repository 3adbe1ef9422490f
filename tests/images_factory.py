"""Image files made in the tests: the bad and awkward inputs real datasets contain."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
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
