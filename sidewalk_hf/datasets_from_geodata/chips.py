"""Chip windows over a raster: ``chip_px`` squares overlapping by ``overlap_px``, read window by window.

Along each axis chips start at 0, ``stride``, ``2 stride``, ... (``stride = chip_px - overlap_px``) and the
last one is flush with the raster's edge, the rule inference's sliding windows follow; an axis shorter than
a chip gets one chip of the axis' length. Never is a whole raster read for a chip.
"""

from __future__ import annotations

from dataclasses import dataclass

# The one rule for windows along an axis, shared with inference's sliding windows.
from ..inference.windows import window_starts as chip_starts


@dataclass(frozen=True)
class ChipGrid:
    """The chips of a ``height`` x ``width`` raster, in rows of chips."""

    height: int
    width: int
    chip_px: int
    overlap_px: int

    def __post_init__(self):
        if self.chip_px < 16:
            raise ValueError(f"--chip-size must be at least 16 px, got {self.chip_px}")
        if not 0 <= self.overlap_px < self.chip_px:
            raise ValueError(f"--overlap must be in [0, chip size), got {self.overlap_px}")

    @property
    def stride_px(self) -> int:
        return self.chip_px - self.overlap_px

    @property
    def row_starts(self) -> list[int]:
        return chip_starts(self.height, self.chip_px, self.stride_px)

    @property
    def col_starts(self) -> list[int]:
        return chip_starts(self.width, self.chip_px, self.stride_px)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def windows(self, first_row: int = 0, stop_row: int | None = None):
        """``rasterio.windows.Window`` of every chip in chip rows ``[first_row, stop_row)``, row-major."""
        from rasterio.windows import Window

        height, width = min(self.chip_px, self.height), min(self.chip_px, self.width)
        for y0 in self.row_starts[first_row:stop_row]:
            for x0 in self.col_starts:
                yield Window(x0, y0, width, height)

    def row_bands(self, chips_per_unit: int) -> list[tuple[int, int]]:
        """Chip rows cut into ``[(r0, r1), ...]`` of about ``chips_per_unit`` chips: the units of work."""
        rows = len(self.row_starts)
        per_band = max(1, chips_per_unit // max(1, len(self.col_starts)))
        return [(r0, min(rows, r0 + per_band)) for r0 in range(0, rows, per_band)]
