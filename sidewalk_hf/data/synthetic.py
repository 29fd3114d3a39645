"""A synthetic aerial sidewalk dataset, written in the Hugging Face Hub layout.

Nothing can be downloaded in tests or in the CPU demo, so the project ships this generator. It renders
top-down orthophoto-like chips of a street grid: asphalt roads with lane markings and curbs, lighter
concrete sidewalks along both sides of every road (sometimes behind a planting strip), zebra crossings at
some intersections, blocks of lots with gabled or flat roofs, paved lots and lawns, tree canopies (some
of them over sidewalks), building and tree shadows, and per-chip colour, brightness, blur and noise. The
grid's rotation, block size, road and sidewalk widths and the ground resolution change from chip to chip.

Each record has

- ``image``: RGB JPEG (quality 90), a ``datasets.Image()`` feature;
- ``mask``: single-channel PNG, 0 background, 1 sidewalk (crossings included), 255 ignore (the part of a
  chip outside the annotated area, on a few chips), a ``datasets.Image()`` feature;
- ``centerlines``: the true sidewalk centerlines of the chip, a list of polylines of ``[x, y]`` points in
  pixels, ``x`` the column and ``y`` the row, origin at the top-left corner of the top-left pixel (pixel
  ``(row, col)`` covers ``x`` in ``[col, col + 1)``, ``y`` in ``[row, row + 1)``).

Like the vector-derived masks of real data, the mask still marks sidewalk under tree canopies; the share
of sidewalk pixels hidden that way is a parameter and is reported in the dataset card.

Every chip is a pure function of ``(seed, split, index, chip_size_px, occluded_sidewalk_fraction)``, so
the same arguments give the same bytes, and adding chips to one split does not change the others.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw
from scipy.ndimage import gaussian_filter

SPLITS = ("train", "validation", "test")
SIDEWALK, BACKGROUND, IGNORE = 1, 0, 255
FEATURES = Features(
    {
        "image": Image(),
        "mask": Image(),
        "centerlines": List(List(List(Value("float32"), length=2))),
    }
)
JPEG_QUALITY = 90
ROWS_PER_ROW_GROUP = 100  # the Hub's row-group size for image datasets: small groups stream in small reads
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}
_LAWN, _PLANTING, _ROAD, _SIDEWALK, _JOINT, _CURB, _LANE_MARKING, _ZEBRA, _PAVED = range(
    9
)  # ground materials
_REFERENCE_CHIP_PX = 256  # lengths below are in pixels of a 256 px chip and scale with chip_size_px

_ROOF_COLOURS = np.array(
    [
        [78, 78, 84],
        [118, 116, 112],
        [168, 166, 160],
        [152, 84, 62],
        [112, 86, 70],
        [132, 62, 56],
        [196, 196, 190],
        [92, 102, 112],
    ],
    dtype=np.float32,
)


@dataclass
class Chip:
    """One rendered chip before encoding."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, values in {0, 1, 255}
    centerlines: list[list[list[float]]]
    sidewalk_px: int
    hidden_sidewalk_px: int
    sidewalk_width_px: float = 0.0  # across a sidewalk, the width that buffers a centerline into its mask


# ---- randomness -----------------------------------------------------------------------------------------


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _cell_hash(key: int, *indices) -> np.ndarray:
    """A 64-bit hash of every combination of integer grid indices (broadcast), fixed by ``key``."""
    arrays = [np.asarray(i, dtype=np.int64).astype(np.uint64) for i in indices]
    h = np.full(np.broadcast_shapes(*(a.shape for a in arrays)), key, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        for a in arrays:
            h = _mix64(h + a * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))
    return h


def _hash_uniform(h: np.ndarray, salt: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per hash; different salts give independent numbers from one hash."""
    with np.errstate(over="ignore"):
        h = _mix64(h + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _cell_uniform(key: int, *indices) -> np.ndarray:
    """A uniform number in [0, 1) for every combination of integer grid indices, fixed by ``key``.

    The scene is defined on an infinite grid of blocks, lots and intersections; hashing their indices gives
    each one its own random properties, the same wherever it is looked up (mask, image and centerlines).
    """
    return _hash_uniform(_cell_hash(key, *indices))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a (cells + 1) random grid upsampled bilinearly to ``shape``."""
    grid = rng.uniform(-1.0, 1.0, (cells[0] + 1, cells[1] + 1)).astype(np.float32)
    (height, width), (cells_y, cells_x) = shape, cells
    pos_y = (np.arange(height, dtype=np.float32) + 0.5) * (cells_y / height)
    pos_x = (np.arange(width, dtype=np.float32) + 0.5) * (cells_x / width)
    i0, j0 = np.minimum(pos_y.astype(np.int64), cells_y - 1), np.minimum(pos_x.astype(np.int64), cells_x - 1)
    f = (pos_y - i0)[:, None]
    rows = grid[i0] * (1 - f) + grid[i0 + 1] * f
    f = (pos_x - j0)[None, :]
    return rows[:, j0] * (1 - f) + rows[:, j0 + 1] * f


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels, filled with False (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src = mask[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _cast_shadow(mask: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Union of ``mask`` swept along (dy, dx): the shadow of an object of that height, itself included."""
    steps = max(1, math.ceil(max(abs(dy), abs(dx))))
    out = mask.copy()
    for t in range(1, steps + 1):
        out |= _shift(mask, round(dy * t / steps), round(dx * t / steps))
    return out


def _clip_segment(p0, p1, width: float, height: float):
    """Liang-Barsky clipping of segment p0-p1 to the rectangle [0, width] x [0, height]; None when outside."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0), (dx, width - x0), (-dy, y0), (dy, height - y0)):
        if p == 0:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return None
    return (x0 + t0 * dx, y0 + t0 * dy), (x0 + t1 * dx, y0 + t1 * dy)


# ---- the scene ------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """The street grid of one chip in a rotated frame (u, v): roads at u = k * period_u and v = l * period_v."""

    height: int
    width: int
    angle: float
    offset_u: float
    offset_v: float
    period_u: float
    period_v: float
    road_half_u: float  # half width of the roads of constant u
    road_half_v: float
    strip: float  # planting strip between curb and sidewalk (0: sidewalk at the curb)
    walk: float  # sidewalk width
    crossing_probability: float
    key: int

    def to_frame(self, x, y):
        c, s, half_x, half_y = math.cos(self.angle), math.sin(self.angle), self.width / 2, self.height / 2
        u = (x - half_x) * c + (y - half_y) * s + self.offset_u
        v = -(x - half_x) * s + (y - half_y) * c + self.offset_v
        return u, v

    def to_pixels(self, u, v):
        c, s, half_x, half_y = math.cos(self.angle), math.sin(self.angle), self.width / 2, self.height / 2
        du, dv = u - self.offset_u, v - self.offset_v
        return half_x + du * c - dv * s, half_y + du * s + dv * c

    def crossing(self, k, l, side, across_u_road: bool):
        """Whether the intersection (k, l) has a crossing on ``side`` (+1/-1) across the given road."""
        return _cell_uniform(self.key, k, l, side, int(across_u_road)) < self.crossing_probability

    def centerline_offset_u(self) -> float:
        return self.road_half_u + self.strip + self.walk / 2

    def centerline_offset_v(self) -> float:
        return self.road_half_v + self.strip + self.walk / 2


def _draw_grid(rng: np.random.Generator, height: int, width: int, px: float) -> _Grid:
    """A random street grid; lengths are in units of ``px`` pixels (the scene's ground resolution)."""
    halves = sorted([rng.uniform(9, 15), rng.uniform(7, 12)], reverse=rng.random() < 0.5)
    period_u, period_v = rng.uniform(190, 400) * px, rng.uniform(190, 560) * px
    return _Grid(
        height=height,
        width=width,
        angle=rng.uniform(0, math.pi / 2),
        offset_u=rng.uniform(0, period_u),
        offset_v=rng.uniform(0, period_v),
        period_u=period_u,
        period_v=period_v,
        road_half_u=halves[0] * px,
        road_half_v=halves[1] * px,
        strip=0.0 if rng.random() < 0.4 else rng.uniform(2, 7) * px,
        walk=rng.uniform(5.5, 9.5) * px,
        crossing_probability=rng.uniform(0.4, 0.95),
        key=int(rng.integers(0, 2**63)),
    )


def _centerlines(grid: _Grid) -> list[list[list[float]]]:
    """Sidewalk centerlines as straight polylines clipped to the chip.

    A centerline runs at ``road_half + strip + walk / 2`` from a road's axis, along the whole sidewalk; where
    it meets a crossing road it continues over the crossing if there is one, else it stops at the corner,
    where it meets the perpendicular sidewalk's centerline.
    """
    width, height = grid.width, grid.height
    corners_u, corners_v = grid.to_frame(np.array([0, width, 0, width]), np.array([0, 0, height, height]))
    lines = []
    for along_v in (True, False):  # lines of constant u run along v, and the other way round
        period_a, period_b = (grid.period_u, grid.period_v) if along_v else (grid.period_v, grid.period_u)
        offset_a = grid.centerline_offset_u() if along_v else grid.centerline_offset_v()
        offset_b = grid.centerline_offset_v() if along_v else grid.centerline_offset_u()
        a_lo, a_hi = (corners_u.min(), corners_u.max()) if along_v else (corners_v.min(), corners_v.max())
        b_lo, b_hi = (corners_v.min(), corners_v.max()) if along_v else (corners_u.min(), corners_u.max())
        for k in range(math.floor((a_lo - offset_a) / period_a), math.ceil((a_hi + offset_a) / period_a) + 1):
            for side in (-1, 1):
                a = k * period_a + side * offset_a
                if not a_lo <= a <= a_hi:
                    continue
                pieces, start = [], b_lo
                for m in range(math.floor(b_lo / period_b), math.ceil(b_hi / period_b) + 1):
                    k_u, l_v = (k, m) if along_v else (m, k)
                    if grid.crossing(k_u, l_v, side, across_u_road=not along_v):
                        continue
                    pieces.append((start, m * period_b - offset_b))
                    start = m * period_b + offset_b
                pieces.append((start, b_hi))
                for b0, b1 in pieces:
                    if b1 <= b0:
                        continue
                    ends = [grid.to_pixels(a, b) if along_v else grid.to_pixels(b, a) for b in (b0, b1)]
                    clipped = _clip_segment(ends[0], ends[1], width, height)
                    if clipped and math.dist(*clipped) > 0.5:
                        lines.append([[round(float(c), 3) for c in point] for point in clipped])
    return lines


def _stamp(target: np.ndarray, mask: np.ndarray, y0: int, x0: int) -> None:
    """OR ``mask`` into ``target`` with its top-left corner at (y0, x0), clipped to ``target``."""
    h, w = target.shape
    ty0, tx0 = max(0, y0), max(0, x0)
    ty1, tx1 = min(h, y0 + mask.shape[0]), min(w, x0 + mask.shape[1])
    if ty0 < ty1 and tx0 < tx1:
        target[ty0:ty1, tx0:tx1] |= mask[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]


@dataclass
class _Canopy:
    """A tree canopy over its bounding box ``[y0, y1) x [x0, x1)`` of the chip."""

    mask: np.ndarray
    shade: np.ndarray
    y0: int
    y1: int
    x0: int
    x1: int


def _tree_canopy(rng, shape, cy, cx, radius, light_dy, light_dx) -> _Canopy | None:
    """A lobed disk, brighter on the side the light comes from and darker at its rim; None when off the chip."""
    reach = radius * 1.25
    y0, y1 = max(0, int(cy - reach)), min(shape[0], int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(shape[1], int(cx + reach) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    dist = np.hypot(dy, dx)
    angle = np.arctan2(dy, dx)
    phase = rng.uniform(0, 2 * np.pi, 2)
    edge = radius * (1 + 0.12 * np.sin(3 * angle + phase[0]) + 0.07 * np.sin(5 * angle + phase[1]))
    lit = 1.0 + 0.3 * (dy * light_dy + dx * light_dx) / radius
    texture = 1 + 0.12 * rng.standard_normal(dist.shape, dtype=np.float32)
    return _Canopy(dist < edge, (lit - 0.25 * (dist / radius) ** 2) * texture, y0, y1, x0, x1)


def render_chip(rng: np.random.Generator, chip_size_px: int, occluded_sidewalk_fraction: float) -> Chip:
    """Render one chip; all randomness comes from ``rng``.

    The ground resolution changes from chip to chip: lengths are drawn in units of a 256-px chip's pixel,
    scaled by ``chip_size_px / 256`` and a random factor in [0.8, 1.25].
    """
    px = chip_size_px / _REFERENCE_CHIP_PX * rng.uniform(0.8, 1.25)
    return render_scene(
        rng,
        chip_size_px,
        chip_size_px,
        px,
        occluded_sidewalk_fraction,
        smooth_cells=(6, 6),
        area_factor=(chip_size_px / _REFERENCE_CHIP_PX) ** 2,
        partial_annotation=True,
    )


def render_scene(
    rng: np.random.Generator,
    height_px: int,
    width_px: int,
    px: float,
    occluded_sidewalk_fraction: float,
    *,
    smooth_cells: tuple[int, int] | None = None,
    area_factor: float | None = None,
    partial_annotation: bool = False,
) -> Chip:
    """Render a ``height_px`` x ``width_px`` scene whose lengths are in units of ``px`` pixels.

    ``px`` = 1 is the scale of a 256-px chip (a sidewalk about 7.5 px wide). ``smooth_cells`` (the grid of
    the low-frequency colour variation) and ``area_factor`` (the number of 256x256 reference areas, which
    sets the number of yard trees) default to values proportional to the scene's size at its scale.
    ``partial_annotation`` lets the edge of the annotated area cross the scene on some draws (chips only).
    """
    height, width = height_px, width_px
    reference_px = _REFERENCE_CHIP_PX * px
    if smooth_cells is None:
        smooth_cells = (max(1, round(6 * height / reference_px)), max(1, round(6 * width / reference_px)))
    if area_factor is None:
        area_factor = height * width / reference_px**2
    grid = _draw_grid(rng, height, width, px)
    px = grid.walk / 7.5  # a length unit that follows the chip's ground resolution

    rows = np.arange(height, dtype=np.float32) + 0.5
    cols = np.arange(width, dtype=np.float32) + 0.5
    u, v = grid.to_frame(cols[None, :], rows[:, None])
    k, l = np.round(u / grid.period_u), np.round(v / grid.period_v)
    du, dv = np.abs(u - k * grid.period_u), np.abs(v - l * grid.period_v)
    side_u, side_v = np.where(u >= k * grid.period_u, 1, -1), np.where(v >= l * grid.period_v, 1, -1)

    hu, hv, strip, walk = grid.road_half_u, grid.road_half_v, grid.strip, grid.walk
    road = (du < hu) | (dv < hv)
    band_u = (du >= hu + strip) & (du < hu + strip + walk)  # sidewalks along the roads of constant u
    band_v = (dv >= hv + strip) & (dv < hv + strip + walk)
    sidewalk = (band_u | band_v) & ~road
    crossing = np.zeros_like(road)
    cand = (du < hu) & band_v  # on a u-road, in line with a v-road's sidewalk
    crossing[cand] = grid.crossing(k[cand], l[cand], side_v[cand], across_u_road=True)
    cand = (dv < hv) & band_u
    crossing[cand] = grid.crossing(k[cand], l[cand], side_u[cand], across_u_road=False)
    sidewalk |= crossing
    road &= ~crossing
    planting = (((du >= hu) & (du < hu + strip)) | ((dv >= hv) & (dv < hv + strip))) & ~road & ~sidewalk
    block = ~road & ~sidewalk & ~planting

    # ---- ground materials, as a map of material codes coloured in one lookup
    joint, dash, stripe = 6.0 * px, 9.0 * px, 2.4 * px
    material = np.full((height, width), _LAWN, np.uint8)
    material[planting] = _PLANTING
    material[road] = _ROAD
    material[sidewalk] = _SIDEWALK
    material[
        sidewalk
        & ~crossing
        & ((band_u & (np.mod(v, joint) < 0.7 * px)) | (band_v & (np.mod(u, joint) < 0.7 * px)))
    ] = _JOINT
    material[
        ~road & ~crossing & (((du >= hu) & (du < hu + 0.9 * px)) | ((dv >= hv) & (dv < hv + 0.9 * px)))
    ] = _CURB
    material[
        road
        & (
            ((du < 0.55 * px) & (dv > hv) & (np.mod(v, 2 * dash) < dash))
            | ((dv < 0.55 * px) & (du > hu) & (np.mod(u, 2 * dash) < dash))
        )
    ] = _LANE_MARKING
    material[crossing] = _ROAD
    material[
        crossing
        & (((du < hu) & (np.mod(u, 2 * stripe) < stripe)) | ((dv < hv) & (np.mod(v, 2 * stripe) < stripe)))
    ] = _ZEBRA

    # ---- lots: roofs, paved lots and gardens, computed on the pixels inside blocks only
    setback = rng.uniform(3, 10) * px
    lot_size = rng.uniform(40, 75) * px
    roof = np.zeros_like(road)
    roof_colour = np.zeros((0, 3), np.float32)
    edge_u = hu + strip + walk + setback
    edge_v = hv + strip + walk + setback
    len_u, len_v = grid.period_u - 2 * edge_u, grid.period_v - 2 * edge_v
    if len_u > 4 * px and len_v > 4 * px:
        n_u, n_v = max(1, round(len_u / lot_size)), max(1, round(len_v / lot_size))
        lot_u, lot_v = len_u / n_u, len_v / n_v
        bu, bv = np.floor(u / grid.period_u), np.floor(v / grid.period_v)
        a, b = u - bu * grid.period_u - edge_u, v - bv * grid.period_v - edge_v
        inside = np.nonzero(block & (a > 0) & (a < len_u) & (b > 0) & (b < len_v))
        bu, bv, a, b = bu[inside], bv[inside], a[inside], b[inside]
        iu, iv = np.clip(np.floor(a / lot_u), 0, n_u - 1), np.clip(np.floor(b / lot_v), 0, n_v - 1)
        lot = _cell_hash(grid.key ^ 0x5BD1E995, bu, bv, iu, iv)
        kind = _hash_uniform(lot, 0)
        half_a = lot_u * 0.5 * (0.45 + 0.4 * _hash_uniform(lot, 1))
        half_b = lot_v * 0.5 * (0.45 + 0.4 * _hash_uniform(lot, 2))
        off_a = a - (iu + 0.5) * lot_u - (lot_u / 2 - half_a) * (2 * _hash_uniform(lot, 3) - 1)
        off_b = b - (iv + 0.5) * lot_v - (lot_v / 2 - half_b) * (2 * _hash_uniform(lot, 4) - 1)
        is_roof = (kind < 0.72) & (np.abs(off_a) < half_a) & (np.abs(off_b) < half_b)
        paved = (kind >= 0.72) & (kind < 0.82)
        material[inside[0][paved], inside[1][paved]] = _PAVED
        colours = _ROOF_COLOURS[(_hash_uniform(lot, 5) * len(_ROOF_COLOURS)).astype(np.int64)]
        colours *= (0.9 + 0.2 * _hash_uniform(lot, 6)).astype(np.float32)[:, None]
        flat = _hash_uniform(lot, 7) < 0.3
        # gabled roofs: the ridge runs along the long side, one slope lit and one in shade
        gable = np.where(np.where(half_a >= half_b, off_b, off_a) > 0, 1.08, 0.84)
        rim = np.minimum(half_a - np.abs(off_a), half_b - np.abs(off_b)) < 1.2 * px
        shading = np.where(flat, np.where(rim, 0.8, 1.0), gable).astype(np.float32)
        roof[inside[0][is_roof], inside[1][is_roof]] = True
        roof_colour = colours[is_roof] * shading[is_roof, None]

    tint = rng.uniform(0.96, 1.04, 3).astype(np.float32)
    asphalt = rng.uniform(58, 100) * np.array([1.0, 1.0, 1.04], np.float32)
    concrete = rng.uniform(160, 210) * np.array([1.02, 1.0, 0.96], np.float32)
    dry = rng.uniform(0, 1)
    lawn = np.array([72, 118, 52], np.float32) * (1 - dry) + np.array([128, 124, 78], np.float32) * dry
    lawn *= rng.uniform(0.85, 1.1)
    paint = np.array([232, 232, 226] if rng.random() < 0.6 else [214, 180, 64], np.float32)
    colours = np.stack(
        [
            lawn,
            lawn * 0.92,
            asphalt,
            concrete,
            concrete * 0.88,
            concrete * 1.06,
            paint,
            [236, 236, 232],
            asphalt * 1.12,
        ]
    )
    # low-frequency variation: patchy lawns, stained asphalt, weathered concrete
    variation = np.array([0.18, 0.18, 0.06, 0.04, 0.04, 0.04, 0.0, 0.03, 0.06], np.float32)
    patches = _smooth_field(rng, (height, width), smooth_cells)
    image = (colours * tint)[material]
    image *= 1 + (variation[material] * patches)[..., None] * np.array([1.0, 0.7, 1.2], np.float32)
    image[roof] = roof_colour

    # ---- shadows (sun direction fixed per chip), then trees
    sun = rng.uniform(0, 2 * np.pi)
    shadow_dy, shadow_dx = math.sin(sun), math.cos(sun)
    roof_height = rng.uniform(3, 9) * px
    shadow = _cast_shadow(roof, shadow_dy * roof_height, shadow_dx * roof_height) & ~roof

    canopy_any = np.zeros_like(road)
    tree_shadow = np.zeros_like(road)
    canopy_colour = np.zeros_like(image)

    def add_tree(tree: _Canopy) -> None:
        colour = np.array([44, 78, 38], np.float32) * rng.uniform(0.75, 1.25) * rng.uniform(0.92, 1.08, 3)
        box = np.s_[tree.y0 : tree.y1, tree.x0 : tree.x1]
        canopy_colour[box][tree.mask] = colour * tree.shade[tree.mask, None]
        canopy_any[box] |= tree.mask
        lift = rng.uniform(0.8, 1.4) * (tree.y1 - tree.y0) / 2.5
        _stamp(tree_shadow, tree.mask, tree.y0 + round(shadow_dy * lift), tree.x0 + round(shadow_dx * lift))

    # yard trees, kept off the sidewalks so that the street trees below set the hidden share
    outer_u, outer_v = hu + strip + walk, hv + strip + walk
    for _ in range(rng.poisson(rng.uniform(2, 14) * area_factor)):
        cy, cx = rng.uniform(0, 1, 2) * (height, width)
        radius = rng.uniform(4, 11) * px
        cu, cv = grid.to_frame(cx, cy)
        clear_u = abs(cu - round(cu / grid.period_u) * grid.period_u) - outer_u
        clear_v = abs(cv - round(cv / grid.period_v) * grid.period_v) - outer_v
        tree = _tree_canopy(rng, (height, width), cy, cx, radius, -shadow_dy, -shadow_dx)
        if tree is not None and min(clear_u, clear_v) > radius * 1.25:
            add_tree(tree)

    # street trees over the sidewalks, until the chip's hidden share is as close as it gets to its target
    sidewalk_px = int(sidewalk.sum())
    hidden = canopy_any & sidewalk
    hidden_px = int(hidden.sum())
    target = sidewalk_px * min(0.5, occluded_sidewalk_fraction * rng.uniform(0.5, 1.5))
    walk_rows, walk_cols = np.nonzero(sidewalk & ~crossing)
    for _ in range(80 * max(1, math.ceil(area_factor))):
        if hidden_px >= target or len(walk_rows) == 0:
            break
        pick = int(rng.integers(len(walk_rows)))
        cy, cx = walk_rows[pick] + rng.uniform(0, 1), walk_cols[pick] + rng.uniform(0, 1)
        tree = _tree_canopy(rng, (height, width), cy, cx, rng.uniform(4, 9) * px, -shadow_dy, -shadow_dx)
        if tree is None:
            continue
        box = np.s_[tree.y0 : tree.y1, tree.x0 : tree.x1]
        newly_hidden = tree.mask & sidewalk[box] & ~hidden[box]
        after = hidden_px + int(newly_hidden.sum())
        if after > target and after - target > target - hidden_px:
            break  # the hidden share is closer to its target without this tree
        add_tree(tree)
        hidden[box] |= newly_hidden
        hidden_px = after

    darkness = rng.uniform(0.48, 0.62) * np.array([0.96, 1.0, 1.12], np.float32)
    image[shadow | tree_shadow] *= darkness
    image[canopy_any] = canopy_colour[canopy_any]

    # ---- camera: exposure, white balance, vignetting-like light falloff, blur, sensor noise
    image *= rng.uniform(0.82, 1.15) * rng.uniform(0.93, 1.07, 3).astype(np.float32)
    image *= (
        1 + 0.08 * _smooth_field(rng, (height, width), tuple(max(1, c // 3) for c in smooth_cells))[..., None]
    )
    image += rng.uniform(0, 14)  # haze
    image = gaussian_filter(image, sigma=(rng.uniform(0.35, 0.85),) * 2 + (0,))
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(1.5, 5.0)
    image_u8 = np.clip(image, 0, 255).astype(np.uint8)

    mask = np.where(sidewalk, SIDEWALK, BACKGROUND).astype(np.uint8)
    if partial_annotation and rng.random() < 0.1:  # the edge of the annotated area crosses this chip
        direction = rng.uniform(0, 2 * np.pi)
        reach = cols[None, :] * math.cos(direction) + rows[:, None] * math.sin(direction)
        mask[reach > np.quantile(reach, 1 - rng.uniform(0.05, 0.25))] = IGNORE
    return Chip(
        image=image_u8,
        mask=mask,
        centerlines=_centerlines(grid),
        sidewalk_px=sidewalk_px,
        hidden_sidewalk_px=hidden_px,
        sidewalk_width_px=float(walk),
    )


# ---- writing the dataset ---------------------------------------------------------------------------------


def _encode_chip(chip: Chip, split: str, index: int) -> dict:
    image_buffer, mask_buffer = io.BytesIO(), io.BytesIO()
    PILImage.fromarray(chip.image).save(image_buffer, format="JPEG", quality=JPEG_QUALITY)
    PILImage.fromarray(chip.mask).save(mask_buffer, format="PNG")
    name = f"{split}-{index:06d}"
    return {
        "image": {"bytes": image_buffer.getvalue(), "path": f"{name}.jpg"},
        "mask": {"bytes": mask_buffer.getvalue(), "path": f"{name}.png"},
        "centerlines": chip.centerlines,
    }


def _shard_bounds(num_records: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal record ranges, one per shard."""
    edges = np.linspace(0, num_records, num_shards + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


@dataclass
class _SplitStats:
    chips: int = 0
    pixels: int = 0
    sidewalk_px: int = 0
    ignore_px: int = 0
    hidden_sidewalk_px: int = 0
    files: int = 0
    arrow_bytes: int = 0

    def add(self, chip: Chip) -> None:
        self.chips += 1
        self.pixels += chip.mask.size
        self.sidewalk_px += chip.sidewalk_px
        self.ignore_px += int((chip.mask == IGNORE).sum())
        self.hidden_sidewalk_px += chip.hidden_sidewalk_px


def _write_split(
    out_dir: Path, split: str, num_records: int, num_shards: int, make_chip, num_to_keep: int
) -> tuple[_SplitStats, list[Chip]]:
    """Render and write one split shard by shard (memory: one row group); returns stats and its first chips."""
    stats, kept = _SplitStats(), []
    shards = _shard_bounds(num_records, max(1, min(num_shards, num_records)))
    schema = FEATURES.arrow_schema
    for shard_index, (start, stop) in enumerate(shards):
        path = out_dir / "data" / f"{split}-{shard_index:05d}-of-{len(shards):05d}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for group_start in range(start, stop, ROWS_PER_ROW_GROUP):
                rows = []
                for index in range(group_start, min(stop, group_start + ROWS_PER_ROW_GROUP)):
                    chip = make_chip(split, index)
                    stats.add(chip)
                    if len(kept) < num_to_keep:
                        kept.append(chip)
                    rows.append(_encode_chip(chip, split, index))
                table = pa.Table.from_pylist(rows, schema=schema)
                writer.write_table(table)
                stats.arrow_bytes += table.nbytes
        stats.files += 1
    return stats, kept


def _dataset_card(splits: dict[str, _SplitStats], *, chip_size_px: int, seed: int, occluded: float) -> str:
    metadata = {
        "license": "cc0-1.0",
        "pretty_name": "Synthetic aerial sidewalk chips",
        "task_categories": ["image-segmentation"],
        "tags": ["synthetic", "aerial-imagery", "orthophoto", "sidewalks", "semantic-segmentation"],
        "dataset_info": {
            "features": FEATURES._to_yaml_list(),
            "splits": [
                {"name": name, "num_bytes": stats.arrow_bytes, "num_examples": stats.chips}
                for name, stats in splits.items()
            ],
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits],
            }
        ],
    }
    rows = "\n".join(
        f"| {name} | {s.chips} | {s.files} | {s.sidewalk_px / max(s.pixels, 1):.3f} | "
        f"{s.hidden_sidewalk_px / max(s.sidewalk_px, 1):.3f} | {s.ignore_px / max(s.pixels, 1):.3f} |"
        for name, s in splits.items()
    )
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False)}---

# Synthetic aerial sidewalk chips

Generated top-down orthophoto-like chips of {chip_size_px}x{chip_size_px} px for sidewalk segmentation: a
street grid at a random rotation and scale with asphalt roads, lane markings and curbs, concrete sidewalks
along both sides of every road (sometimes behind a planting strip), zebra crossings at some intersections,
roofs, paved lots and lawns, tree canopies, building and tree shadows, and per-chip colour, exposure, blur
and noise. Generated by `sidewalk_hf.data.synthetic.generate_synthetic_dataset` with seed {seed}; the same
arguments give the same bytes.

## Fields

- `image`: RGB JPEG, quality {JPEG_QUALITY}.
- `mask`: single-channel PNG; 0 background, 1 sidewalk (crossings included), 255 ignore (the part of a
  chip outside the annotated area, on about one chip in ten).
- `centerlines`: the true sidewalk centerlines, a list of polylines of `[x, y]` points in pixels (`x` the
  column, `y` the row; pixel `(row, col)` covers `x` in `[col, col + 1)` and `y` in `[row, row + 1)`).
  They continue over crossings and stop at corners without one.

Tree canopies hide part of the sidewalks while the mask still marks them, as masks derived from vector
data do. The generator aimed at {occluded:.1%} of sidewalk pixels hidden per chip on average.

## Splits

| split | chips | parquet shards | sidewalk pixel share | hidden sidewalk share | ignore pixel share |
| --- | --- | --- | --- | --- | --- |
{rows}

![chips and masks](contact_sheet.png)

The contact sheet shows chips beside their masks (white sidewalk, magenta ignore, red centerlines).
"""


def _contact_sheet(chips: list[Chip], path: Path, columns: int = 3) -> None:
    """Chips beside their masks, with the centerlines drawn on the masks, for a person to look at."""
    if not chips:
        return
    size, gap = chips[0].image.shape[0], 4
    rows = math.ceil(len(chips) / columns)
    sheet = PILImage.new(
        "RGB", (columns * (2 * size + gap) + gap, rows * (size + gap) + gap), (255, 255, 255)
    )
    palette = np.zeros((256, 3), np.uint8)
    palette[BACKGROUND], palette[SIDEWALK], palette[IGNORE] = (40, 40, 40), (255, 255, 255), (200, 0, 200)
    for i, chip in enumerate(chips):
        x = gap + (i % columns) * (2 * size + gap)
        y = gap + (i // columns) * (size + gap)
        sheet.paste(PILImage.fromarray(chip.image), (x, y))
        mask = PILImage.fromarray(palette[chip.mask])
        draw = ImageDraw.Draw(mask)
        for line in chip.centerlines:
            draw.line([tuple(point) for point in line], fill=(255, 0, 0), width=max(1, size // 128))
        sheet.paste(mask, (x + size, y))
    sheet.save(path, format="PNG")


def generate_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_train: int,
    num_validation: int,
    num_test: int,
    chip_size_px: int = 256,
    seed: int = 0,
    num_shards: int = 4,
    occluded_sidewalk_fraction: float = 0.07,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset to ``out_dir`` in the Hub layout and return ``out_dir``.

    Layout: ``data/<split>-XXXXX-of-YYYYY.parquet`` (up to ``num_shards`` shards per split, so that several
    processes and DataLoader workers can read in parallel), ``README.md`` (dataset card with the features and
    splits in its YAML header, so ``datasets.load_dataset(out_dir, split=..., streaming=True)`` finds
    them) and ``contact_sheet.png``. A split with no chips is left out. The dataset is built in a temporary
    folder beside ``out_dir`` and moved into place at the end, so an interrupted run never leaves a partial
    dataset where a training run would pick it up.
    """
    out_dir = Path(out_dir)
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"chip counts must be >= 0, got {counts}")
    if chip_size_px < 32:
        raise ValueError(f"chip_size_px must be at least 32, got {chip_size_px}")
    if not 0 <= occluded_sidewalk_fraction <= 0.5:
        raise ValueError(f"occluded_sidewalk_fraction must be in [0, 0.5], got {occluded_sidewalk_fraction}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")

    def make_chip(split: str, index: int) -> Chip:
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
        return render_chip(rng, chip_size_px, occluded_sidewalk_fraction)

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "data").mkdir(parents=True)
    try:
        shown: list[Chip] = []
        stats = {}
        for split, num_records in counts.items():
            if num_records == 0:
                continue
            stats[split], kept = _write_split(
                tmp_dir, split, num_records, num_shards, make_chip, num_to_keep=6 - len(shown)
            )
            shown += kept
        _contact_sheet(shown, tmp_dir / "contact_sheet.png")
        card = _dataset_card(stats, chip_size_px=chip_size_px, seed=seed, occluded=occluded_sidewalk_fraction)
        (tmp_dir / "README.md").write_text(card)
        (tmp_dir / "generation.json").write_text(
            json.dumps(
                {
                    "generator": "sidewalk_hf.data.synthetic.generate_synthetic_dataset",
                    "seed": seed,
                    "chip_size_px": chip_size_px,
                    "occluded_sidewalk_fraction": occluded_sidewalk_fraction,
                    "num_shards": num_shards,
                    "counts": counts,
                },
                indent=2,
            )
            + "\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
