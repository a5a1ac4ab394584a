"""Loss-curve PNG without a plotting library: a tiny rasterizer plus a PNG encoder (zlib + struct).

Why not matplotlib: it is not a dependency of the package and the demo must produce its plot on a
fresh machine without network. The picture needed is simple (one or two polylines, axes, a few
tick labels), so a 100-line rasterizer gives the same image everywhere, byte for byte.

The PNG is 8-bit RGB, one IDAT chunk, filter type 0 on every scanline. Text uses a built-in 3x5
pixel font for digits and the few characters the labels need.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
BLUE: Color = (31, 119, 180)
ORANGE: Color = (255, 127, 14)

# 3x5 glyphs, rows top to bottom, 3 bits each (bit 2 = left column)
_FONT: dict[str, tuple[int, ...]] = {
    "0": (7, 5, 5, 5, 7),
    "1": (2, 6, 2, 2, 7),
    "2": (7, 1, 7, 4, 7),
    "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7),
    "6": (7, 4, 7, 5, 7),
    "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7),
    "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2),
    "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7),
    "+": (0, 2, 7, 2, 0),
    " ": (0, 0, 0, 0, 0),
    "s": (0, 3, 6, 1, 6),
    "t": (2, 7, 2, 2, 3),
    "p": (0, 7, 5, 7, 4),
    "l": (2, 2, 2, 2, 2),
    "o": (0, 7, 5, 5, 7),
    "v": (0, 5, 5, 5, 2),
    "a": (0, 6, 3, 5, 7),
    "r": (0, 7, 4, 4, 4),
    "i": (2, 0, 2, 2, 2),
    "n": (0, 6, 5, 5, 5),
}


class Canvas:
    """An RGB image with pixel, line and text drawing."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, c: Color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c: Color, width: int = 1) -> None:
        """Straight line by uniform sampling (enough for plots; no anti-aliasing)."""
        n = max(1, int(max(abs(x1 - x0), abs(y1 - y0)) * 2))
        r = width // 2
        for k in range(n + 1):
            t = k / n
            x = round(x0 + (x1 - x0) * t)
            y = round(y0 + (y1 - y0) * t)
            for dx in range(-r, width - r):
                for dy in range(-r, width - r):
                    self.set(x + dx, y + dy, c)

    def text(self, x: int, y: int, s: str, c: Color = BLACK, scale: int = 2) -> None:
        """Draw ``s`` with its top-left corner at (x, y); unknown characters are skipped."""
        for ch in s.lower():
            glyph = _FONT.get(ch)
            if glyph is not None:
                for row, bits in enumerate(glyph):
                    for col in range(3):
                        if bits >> (2 - col) & 1:
                            for sx in range(scale):
                                for sy in range(scale):
                                    self.set(x + col * scale + sx, y + row * scale + sy, c)
            x += 4 * scale

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        stride = 3 * self.w
        raw = b"".join(
            b"\x00" + bytes(self.px[y * stride : (y + 1) * stride]) for y in range(self.h)
        )
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if 0.01 <= abs(v) < 1000:
        return f"{v:.3g}"
    return f"{v:.1e}"


def plot_curves(
    series: list[tuple[list[float], list[float], Color]],
    path: str | Path,
    width: int = 640,
    height: int = 400,
    title: str = "",
) -> Path:
    """Draw (xs, ys, color) polylines on shared axes with tick labels and write a PNG."""
    pts = [(x, y) for xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not pts:
        raise ValueError("nothing to plot: no finite points")
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pad = 0.05 * (y_hi - y_lo)
    # a margin around the data, but no negative tick under losses that are all >= 0
    y_lo = max(0.0, y_lo - pad) if y_lo >= 0 else y_lo - pad
    y_hi = y_hi + pad
    left, right, top, bottom = 70, width - 20, 30, height - 40
    cv = Canvas(width, height)

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def sy(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    for k in range(5):  # grid and tick labels
        fy = y_lo + (y_hi - y_lo) * k / 4
        cv.line(left, sy(fy), right, sy(fy), GRID)
        cv.text(4, round(sy(fy)) - 5, _fmt(fy))
        fx = x_lo + (x_hi - x_lo) * k / 4
        cv.line(sx(fx), top, sx(fx), bottom, GRID)
        label = _fmt(round(fx)) if x_hi - x_lo >= 4 else _fmt(fx)
        cv.text(round(sx(fx)) - 4 * len(label), bottom + 8, label)
    cv.line(left, top, left, bottom, BLACK)
    cv.line(left, bottom, right, bottom, BLACK)
    for xs, ys, color in series:
        prev = None
        for x, y in zip(xs, ys):
            if not math.isfinite(y):
                prev = None
                continue
            p = (sx(x), sy(y))
            if prev is not None:
                cv.line(*prev, *p, color, width=2)
            elif len(xs) == 1:
                cv.line(p[0] - 2, p[1], p[0] + 2, p[1], color, width=3)
            prev = p
    if title:
        cv.text(left, 8, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(cv.png())
    return out


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Train loss (blue) and eval loss (orange) against the step, from a metrics JSONL file."""
    train_x, train_y, eval_x, eval_y = [], [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec:
            train_x.append(rec["step"])
            train_y.append(rec["loss"])
        if "eval_loss" in rec:
            eval_x.append(rec["step"])
            eval_y.append(rec["eval_loss"])
    series = [(train_x, train_y, BLUE)]
    if eval_x:
        series.append((eval_x, eval_y, ORANGE))
    return plot_curves(series, png_path, title="train loss" + (" + eval loss" if eval_x else ""))


def read_png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG header (for tests and sanity checks)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", data[16:24])
