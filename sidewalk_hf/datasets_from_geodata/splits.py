"""Train / validation / test splits without leakage: whole spatial blocks (or whole rasters) per split.

Blocks are squares of ``block_m`` metres on a grid in one metric frame for the whole build (the first
raster's CRS scaled to metres, or its local UTM zone), so a place falls in the same block whatever raster
it is seen in. A block's split is a pure function of ``(seed, block)``, hence the same on every run and in
every worker. A chip belongs to the block(s) its footprint touches; a chip that touches blocks of different
splits is dropped (and counted), so that no two chips of different splits ever overlap: every kept chip
lies inside the blocks of its own split. With ``by="raster"`` each raster is one block instead (rasters
must then not overlap each other).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "validation", "test")
SPLIT_BY = ("block", "raster")


def parse_split_fractions(value) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` or ``[0.8, 0.1, 0.1]`` -> fractions of train, validation, test summing to 1."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        fractions = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"--split {value!r}: expected three numbers, train,validation,test (e.g. 0.8,0.1,0.1)"
        )
    if len(fractions) != 3 or any(f < 0 or not math.isfinite(f) for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"--split {value!r}: expected three non-negative numbers, e.g. 0.8,0.1,0.1")
    total = sum(fractions)
    return tuple(f / total for f in fractions)


def unit_interval(*key) -> float:
    """A uniform number in [0, 1) that depends only on ``key``."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass(frozen=True)
class SplitPlan:
    """How chips are given to splits; picklable, the same in every worker."""

    fractions: tuple[float, float, float]
    seed: int
    by: str = "block"
    block_m: float = 500.0
    frame_crs_wkt: str = ""  # the metric frame of the blocks
    frame_unit_m: float = 1.0

    def __post_init__(self):
        if self.by not in SPLIT_BY:
            raise ValueError(f"--split-by {self.by!r}: valid values are {list(SPLIT_BY)}")
        if self.by == "block" and not self.block_m > 0:
            raise ValueError(f"--split-block-m must be > 0, got {self.block_m}")

    def split_of(self, *key) -> str:
        u = unit_interval(self.seed, *key)
        edges = np.cumsum(self.fractions)
        for name, edge in zip(SPLITS, edges):
            if u < edge:
                return name
        return next(name for name, f in zip(reversed(SPLITS), reversed(self.fractions)) if f > 0)

    def blocks_of(self, x_m: np.ndarray, y_m: np.ndarray) -> list[tuple[int, int]]:
        """The blocks a footprint with vertices at (x_m, y_m) (frame metres) touches (its bounding box)."""
        eps = 1e-6 * self.block_m
        ix = range(math.floor(x_m.min() / self.block_m), math.floor((x_m.max() - eps) / self.block_m) + 1)
        iy = range(math.floor(y_m.min() / self.block_m), math.floor((y_m.max() - eps) / self.block_m) + 1)
        return [(i, j) for i in ix for j in iy]

    def for_raster(self, raster_name: str, raster_crs) -> RasterSplitter:
        return RasterSplitter(self, raster_name, raster_crs)


class RasterSplitter:
    """The split of each chip of one raster (None: the chip straddles blocks of different splits)."""

    def __init__(self, plan: SplitPlan, raster_name: str, raster_crs):
        from pyproj import CRS, Transformer

        self.plan, self.raster_name = plan, raster_name
        self._to_frame = None
        if plan.by == "block":
            source = CRS.from_user_input(raster_crs.to_wkt() if hasattr(raster_crs, "to_wkt") else raster_crs)
            frame = CRS.from_wkt(plan.frame_crs_wkt)
            if source != frame:
                self._to_frame = Transformer.from_crs(source, frame, always_xy=True)

    def split_of_chip(self, corners_x: np.ndarray, corners_y: np.ndarray) -> str | None:
        """``corners_*``: the chip's outline in the raster's CRS (corners and edge points)."""
        if self.plan.by == "raster":
            return self.plan.split_of("raster", self.raster_name)
        x, y = corners_x, corners_y
        if self._to_frame is not None:
            x, y = self._to_frame.transform(x, y)
        unit = self.plan.frame_unit_m
        splits = {
            self.plan.split_of(*block)
            for block in self.plan.blocks_of(np.asarray(x) * unit, np.asarray(y) * unit)
        }
        return splits.pop() if len(splits) == 1 else None
