"""A loss curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 800, 480, 60


def smoothed(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_loss_plot(losses: Sequence[float], path: Path, title: str = "EAGLE-3 head training loss") -> None:
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    if losses:
        curve = smoothed(losses, max(len(losses) // 50, 1))
        lo, hi = min(curve), max(curve)
        span = (hi - lo) or 1.0

        def point(i: int, v: float):
            x = left + (right - left) * i / max(len(curve) - 1, 1)
            return x, bottom - (bottom - top) * (v - lo) / span

        draw.line([point(i, v) for i, v in enumerate(curve)], fill="blue", width=2)
        for frac in (0.0, 0.5, 1.0):
            value = lo + span * frac
            y = bottom - (bottom - top) * frac
            draw.text((4, y - 6), f"{value:.2f}", fill="black")
        draw.text((left, bottom + 8), "step 0", fill="black")
        draw.text((right - 80, bottom + 8), f"step {len(losses)}", fill="black")
    img.save(path)
