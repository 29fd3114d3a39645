"""Validation pictures: image | ground truth | prediction, sidewalk drawn over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TRUTH_COLOUR = np.array([0, 220, 0], dtype=np.float32)
PREDICTION_COLOUR = np.array([255, 40, 40], dtype=np.float32)
IGNORE_COLOUR = np.array([255, 255, 0], dtype=np.float32)


def _overlay(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, ignore_value: int) -> np.ndarray:
    out = image.astype(np.float32)
    sidewalk = mask == 1
    out[sidewalk] = 0.45 * out[sidewalk] + 0.55 * colour
    ignored = mask == ignore_value
    out[ignored] = 0.7 * out[ignored] + 0.3 * IGNORE_COLOUR
    return out.clip(0, 255).astype(np.uint8)


def overlay_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, ignore_value: int = 255):
    """One row: the image, the truth in green (ignored pixels tinted yellow), the prediction in red."""
    row = np.concatenate(
        [image, _overlay(image, truth, TRUTH_COLOUR, ignore_value), _overlay(image, prediction, PREDICTION_COLOUR, -1)],
        axis=1,
    )
    return Image.fromarray(row)


def save_overlay_grid(rows: list[Image.Image], path: Path, title: str = "") -> Path:
    """Stack panels vertically under a one-line title."""
    if not rows:
        raise ValueError("no pictures to save")
    header = 18 if title else 0
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, header + sum(r.height for r in rows)), "white")
    if title:
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
    y = header
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
