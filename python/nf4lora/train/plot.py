"""write_loss_png: the training-loss curve as a PNG, drawn and encoded here (zlib + struct, the
PNG spec's IHDR/IDAT/IEND chunks), so the runtime needs no matplotlib. A plain chart: axes, a
light grid at 4 divisions, the raw loss in grey and a moving average in blue; the numbers are in
metrics.json. Tested by tests/test_finetune.py (decodes the file and checks the curve's pixels)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

from ..files import write_atomic

WIDTH, HEIGHT, MARGIN = 640, 360, 30


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(pixels: list[bytearray], width: int, height: int) -> bytes:
    """8-bit RGB rows (each width*3 bytes) -> PNG bytes (filter 0 on every row)."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def _line(img: list[bytearray], x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(n + 1):
        x = round(x0 + (x1 - x0) * i / n)
        y = round(y0 + (y1 - y0) * i / n)
        if 0 <= x < WIDTH and 0 <= y < HEIGHT:
            img[y][3 * x:3 * x + 3] = bytes(rgb)


def loss_image(losses: Sequence[float]) -> list[bytearray]:
    img = [bytearray(b"\xff" * (WIDTH * 3)) for _ in range(HEIGHT)]
    left, right, top, bottom = MARGIN, WIDTH - MARGIN, MARGIN, HEIGHT - MARGIN
    for k in range(1, 4):
        y = top + (bottom - top) * k // 4
        x = left + (right - left) * k // 4
        _line(img, left, y, right, y, (225, 225, 225))
        _line(img, x, top, x, bottom, (225, 225, 225))
    _line(img, left, bottom, right, bottom, (0, 0, 0))
    _line(img, left, top, left, bottom, (0, 0, 0))
    finite = [v for v in losses if v == v and abs(v) != float("inf")]
    if not finite:
        return img
    lo, hi = min(finite), max(finite)
    hi = hi if hi > lo else lo + 1.0

    def xy(i: int, v: float) -> tuple[int, int]:
        x = left + (right - left) * i // max(1, len(losses) - 1)
        return x, round(bottom - (bottom - top) * (v - lo) / (hi - lo))

    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    for series, rgb in ((losses, (170, 170, 170)), (smooth, (31, 90, 200))):
        points = [xy(i, v) for i, v in enumerate(series)]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
            _line(img, x0, y0, x1, y1, rgb)
    return img


def write_loss_png(path: Path, losses: Sequence[float]) -> str:
    """Writes the curve atomically; returns a one-line note for the log."""
    write_atomic(path, encode_png(loss_image(losses), WIDTH, HEIGHT))
    return f"loss curve: {path}"
