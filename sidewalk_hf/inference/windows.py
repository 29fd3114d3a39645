"""Sliding windows over a raster and the weights that blend their logits without seams.

The model is run on windows of its training chip size (the ASPP's image pooling averages the whole window,
so the window size changes predictions). Windows overlap by default (stride 0.75 x window); along each axis
the last window is flush with the raster's edge, and an axis shorter than a window gets one window of the
axis' length. Logits are blended with a raised-cosine (Hann) weight, strictly positive everywhere, so that a
pixel's prediction moves smoothly from one window to the next instead of jumping at a window border.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

BLENDS = ("cosine", "gaussian", "none")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts along one axis: 0, stride, 2*stride, ... and a last window flush with the end."""
    if window >= length:
        return [0]
    starts = list(range(0, length - window, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class WindowGrid:
    """Window positions over a ``height`` x ``width`` raster, rows of windows in raster order."""

    height: int
    width: int
    window_px: int
    stride_px: int

    @classmethod
    def for_raster(cls, height: int, width: int, window_px: int, stride_fraction: float) -> WindowGrid:
        if window_px < 16:
            raise ValueError(f"the window must be at least 16 px, got {window_px}")
        if not 0 < stride_fraction <= 1:
            raise ValueError(f"the stride is a fraction of the window in (0, 1], got {stride_fraction}")
        return cls(height, width, window_px, max(1, round(window_px * stride_fraction)))

    @property
    def window_shape(self) -> tuple[int, int]:
        return min(self.window_px, self.height), min(self.window_px, self.width)

    # Computed once per grid: ``window`` is called for every window of a raster.
    @functools.cached_property
    def row_starts(self) -> list[int]:
        return window_starts(self.height, self.window_px, self.stride_px)

    @functools.cached_property
    def col_starts(self) -> list[int]:
        return window_starts(self.width, self.window_px, self.stride_px)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def window(self, index: int) -> tuple[int, int, int, int]:
        """``(row, col, y0, x0)`` of window ``index`` (row-major)."""
        cols = self.col_starts
        row, col = divmod(index, len(cols))
        return row, col, self.row_starts[row], cols[col]

    def rows_for_output_band(self, y0: int, y1: int) -> tuple[int, int]:
        """The window rows ``[r0, r1)`` whose windows cover any output row in ``[y0, y1)``."""
        starts, h = self.row_starts, self.window_shape[0]
        r0 = next(r for r, start in enumerate(starts) if start + h > y0)
        r1 = max(r for r, start in enumerate(starts) if start < y1) + 1
        return r0, r1

    def band_rows(self, num_bands: int) -> list[tuple[int, int]]:
        """Split the output rows into ``num_bands`` bands at window-row starts: ``[(y0, y1), ...]``."""
        starts = self.row_starts
        num_bands = max(1, min(num_bands, len(starts)))
        cuts = [starts[round(i * len(starts) / num_bands)] for i in range(num_bands)] + [self.height]
        return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def blend_weights(shape: tuple[int, int], blend: str = "cosine") -> np.ndarray:
    """A (h, w) float32 weight, largest in the middle and > 0 everywhere."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")

    def axis(n: int) -> np.ndarray:
        t = (np.arange(n, dtype=np.float64) + 0.5) / n
        if blend == "cosine":
            w = 0.5 - 0.5 * np.cos(2 * math.pi * t)
        elif blend == "gaussian":
            w = np.exp(-0.5 * ((t - 0.5) / 0.25) ** 2)
        else:
            w = np.ones(n)
        return np.maximum(w, 1e-3)

    return np.outer(axis(shape[0]), axis(shape[1])).astype(np.float32)


def seam_ratio(classes: np.ndarray, grid: WindowGrid, valid: np.ndarray | None = None) -> dict:
    """How much likelier a class flip is across a window border than elsewhere.

    A flip is a pair of 4-neighbours with different classes. Border pairs straddle a window edge (between
    columns ``x0 - 1`` and ``x0``, or ``x0 + w - 1`` and ``x0 + w``, and likewise for rows) inside the raster;
    the ratio is the flip rate on border pairs over the flip rate on all other pairs. About 1 means no seams;
    a model run on disjoint windows (stride = window) shows its seams as a ratio well above 1.
    """
    h, w = grid.window_shape
    col_edges = sorted({x for x0 in grid.col_starts for x in (x0, x0 + w)} - {0, grid.width})
    row_edges = sorted({y for y0 in grid.row_starts for y in (y0, y0 + h)} - {0, grid.height})
    flips_x = classes[:, 1:] != classes[:, :-1]  # pair (x-1, x) at index x-1
    flips_y = classes[1:, :] != classes[:-1, :]
    if valid is not None:
        flips_x &= valid[:, 1:] & valid[:, :-1]
        flips_y &= valid[1:, :] & valid[:-1, :]
        pairs_x = valid[:, 1:] & valid[:, :-1]
        pairs_y = valid[1:, :] & valid[:-1, :]
    else:
        pairs_x, pairs_y = np.ones_like(flips_x), np.ones_like(flips_y)
    border_x = np.zeros(flips_x.shape[1], bool)
    border_x[[x - 1 for x in col_edges]] = True
    border_y = np.zeros(flips_y.shape[0], bool)
    border_y[[y - 1 for y in row_edges]] = True
    on_border = int(flips_x[:, border_x].sum() + flips_y[border_y].sum())
    border_pairs = int(pairs_x[:, border_x].sum() + pairs_y[border_y].sum())
    elsewhere = int(flips_x[:, ~border_x].sum() + flips_y[~border_y].sum())
    other_pairs = int(pairs_x[:, ~border_x].sum() + pairs_y[~border_y].sum())
    border_rate = on_border / max(border_pairs, 1)
    other_rate = elsewhere / max(other_pairs, 1)
    return {
        "border_flip_rate": border_rate,
        "other_flip_rate": other_rate,
        "seam_ratio": border_rate / other_rate if other_rate else float("inf"),
        "border_pairs": border_pairs,
    }
