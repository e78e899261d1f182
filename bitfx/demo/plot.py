"""A loss plot as a PNG, with nothing beyond the standard library (no plotting package).

Curves are drawn as lines on a white canvas with a frame and horizontal grid lines; the
legend and the axis ranges are returned as text for the caller to print beside the file.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["write_curves_png", "COLORS"]

# (name, RGB): the curves' colors in order.
COLORS = [("blue", (31, 119, 180)), ("orange", (255, 127, 14)), ("green", (44, 160, 44)), ("red", (214, 39, 40))]


def _png(path: str, width: int, height: int, pixels: bytearray) -> None:
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def write_curves_png(path: str, curves: dict[str, list[float]], width: int = 720, height: int = 420) -> str:
    """Draw ``curves`` (label -> values at steps 0, 1, ...) into a PNG at ``path``; returns the
    legend and ranges in words (``"blue: ...; orange: ...; x: steps 0..N, y: a..b"``)."""
    pixels = bytearray(b"\xff" * (width * height * 3))
    left, right, top, bottom = 50, width - 20, 20, height - 40
    values = [v for c in curves.values() for v in c if v == v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    steps = max((len(c) for c in curves.values()), default=1)

    def put(x: int, y: int, rgb) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i:i + 3] = bytes(rgb)

    def line(x0, y0, x1, y1, rgb, thick=1) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            x, y = round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)
            for dx in range(thick):
                for dy in range(thick):
                    put(x + dx, y + dy, rgb)

    for g in range(5):  # grid
        y = round(top + (bottom - top) * g / 4)
        line(left, y, right, y, (225, 225, 225))
    for x0, y0, x1, y1 in ((left, top, left, bottom), (left, bottom, right, bottom), (right, top, right, bottom),
                           (left, top, right, top)):
        line(x0, y0, x1, y1, (0, 0, 0))

    def px(i: int, v: float) -> tuple[int, int]:
        x = left + (right - left) * i / max(steps - 1, 1)
        y = bottom - (bottom - top) * (v - lo) / (hi - lo)
        return round(x), round(y)

    legend = []
    for (label, c), (name, rgb) in zip(curves.items(), COLORS):
        pts = [px(i, v) for i, v in enumerate(c) if v == v]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            line(x0, y0, x1, y1, rgb, thick=2)
        legend.append(f"{name}: {label}")
    _png(path, width, height, pixels)
    return "; ".join(legend) + f"; x: steps 0..{steps - 1}, y: loss {lo:.2f}..{hi:.2f}"
