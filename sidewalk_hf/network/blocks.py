"""Blocks with a halo, clipped to their cores and merged by exact coordinates.

A large raster is processed block by block: each block reads its core plus a halo, builds the skeleton
graph of that window, and keeps only what lies in its core. The core is the half-open pixel-centre
rectangle ``[c0 - 0.5, c1 - 0.5) x [r0 - 0.5, r1 - 0.5)``; skeleton vertices are integers, so every cut
falls strictly between two vertices, at a point on the core's border that both neighbouring blocks compute
with the same arithmetic (from the segment's two ends taken in lexicographic order). Merging is therefore
exact: the pieces of a line meet at bit-identical points, which ``merge_pieces`` dissolves and removes (a
cut point lies on the segment it cut, so removing it restores that segment), and the result equals the
graph of the whole raster at once (``line_graph.canonical``), provided the halo is wider than the widest
part of the mask (thinning reaches no farther) and than the extent of the smallest kept object.

Cut points left with one piece (at a tile's border, its neighbour not yet merged) stay as ends; they are
the only vertices with a non-integer pixel coordinate, which is how later steps recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .line_graph import LineGraph, canonical, dissolve_degree_two


@dataclass(frozen=True)
class Block:
    """A block's core and its window (core + halo, clipped to the raster), ``(row0, row1, col0, col1)``."""

    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]

    def open_edges(self, raster_shape: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
        """Window edges (top, bottom, left, right) that lie inside the raster."""
        r0, r1, c0, c1 = self.window
        return (r0 > 0, r1 < raster_shape[0], c0 > 0, c1 < raster_shape[1])


def block_grid(
    height: int,
    width: int,
    block_px: int,
    halo_px: int,
    area: tuple[int, int, int, int] | None = None,
) -> list[Block]:
    """Blocks of ``block_px`` covering ``area`` (default: the whole ``height`` x ``width`` raster)."""
    if block_px < 1 or halo_px < 0:
        raise ValueError(f"block size must be >= 1 px and halo >= 0 px, got {block_px} and {halo_px}")
    r_lo, r_hi, c_lo, c_hi = area if area is not None else (0, height, 0, width)
    blocks = []
    for r0 in range(r_lo, r_hi, block_px):
        for c0 in range(c_lo, c_hi, block_px):
            r1, c1 = min(r0 + block_px, r_hi), min(c0 + block_px, c_hi)
            window = (
                max(0, r0 - halo_px),
                min(height, r1 + halo_px),
                max(0, c0 - halo_px),
                min(width, c1 + halo_px),
            )
            blocks.append(Block((r0, r1, c0, c1), window))
    return blocks


def _crossing_points(p: np.ndarray, q: np.ndarray, axis: int, bound: np.ndarray) -> np.ndarray:
    """Where segments p-q cross the line ``coordinate[axis] = bound``, computed from the segments' ends in
    lexicographic order so that every block gets the same bits."""
    swap = (q[:, 0] < p[:, 0]) | ((q[:, 0] == p[:, 0]) & (q[:, 1] < p[:, 1]))
    a = np.where(swap[:, None], q, p)
    b = np.where(swap[:, None], p, q)
    other = 1 - axis
    with np.errstate(divide="ignore", invalid="ignore"):
        value = a[:, other] + (bound - a[:, axis]) * (b[:, other] - a[:, other]) / (b[:, axis] - a[:, axis])
    out = np.empty_like(p)
    out[:, axis] = bound
    out[:, other] = value
    return out


def clip_to_core(graph: LineGraph, core: tuple[int, int, int, int]) -> LineGraph:
    """The parts of ``graph``'s edges inside a block's core (pixel-centre coordinates, see the module)."""
    if not graph.num_edges:
        return graph
    r0, r1, c0, c1 = core
    lo = np.array([c0 - 0.5, r0 - 0.5])
    hi = np.array([c1 - 0.5, r1 - 0.5])
    coords, offsets = graph.coords, graph.offsets
    seg_edge = np.repeat(np.arange(graph.num_edges), np.diff(offsets) - 1)
    last_vertex = np.ones(len(coords), bool)
    last_vertex[offsets[1:] - 1] = False
    seg_start = np.flatnonzero(last_vertex)
    p, q = coords[seg_start], coords[seg_start + 1]
    d = q - p
    t_enter = np.zeros(len(p))
    t_exit = np.ones(len(p))
    enter_axis = np.full(len(p), -1)
    exit_axis = np.full(len(p), -1)
    enter_bound = np.zeros(len(p))
    exit_bound = np.zeros(len(p))
    empty = np.zeros(len(p), bool)
    for axis in (0, 1):
        moving = d[:, axis] != 0
        still = ~moving
        empty |= still & ((p[:, axis] < lo[axis]) | (p[:, axis] >= hi[axis]))
        with np.errstate(divide="ignore", invalid="ignore"):
            t_lo = (lo[axis] - p[:, axis]) / d[:, axis]
            t_hi = (hi[axis] - p[:, axis]) / d[:, axis]
        forward = d[:, axis] > 0
        t_in = np.where(forward, t_lo, t_hi)
        t_out = np.where(forward, t_hi, t_lo)
        b_in = np.where(forward, lo[axis], hi[axis])
        b_out = np.where(forward, hi[axis], lo[axis])
        later_in = moving & (t_in > t_enter)
        t_enter = np.where(later_in, t_in, t_enter)
        enter_axis = np.where(later_in, axis, enter_axis)
        enter_bound = np.where(later_in, b_in, enter_bound)
        earlier_out = moving & (t_out < t_exit)
        t_exit = np.where(earlier_out, t_out, t_exit)
        exit_axis = np.where(earlier_out, axis, exit_axis)
        exit_bound = np.where(earlier_out, b_out, exit_bound)
    keep = ~empty & (t_exit > t_enter)
    if not keep.any():
        return LineGraph()

    def cut(points_axis, points_bound, fallback):
        out = fallback.copy()
        for axis in (0, 1):
            sel = points_axis == axis
            if sel.any():
                out[sel] = _crossing_points(p[sel], q[sel], axis, points_bound[sel])
        return out

    start = cut(enter_axis, enter_bound, p)
    end = cut(exit_axis, exit_bound, q)
    # a segment through a corner of the core: both coordinates are the core's bounds exactly
    for points, bounds_axis in ((start, enter_axis), (end, exit_axis)):
        for axis in (0, 1):
            other = 1 - axis
            for bound in (lo[other], hi[other]):
                near = (bounds_axis == axis) & (np.abs(points[:, other] - bound) < 1e-9)
                points[near, other] = bound

    kept = np.flatnonzero(keep)
    edge_of = seg_edge[kept]
    enters = t_enter[kept] > 0
    leaves = t_exit[kept] < 1
    first_of_edge = np.r_[True, edge_of[1:] != edge_of[:-1]]
    contiguous_prev = np.r_[False, (kept[1:] == kept[:-1] + 1) & ~leaves[:-1] & ~enters[1:]] & ~first_of_edge
    piece_start = ~contiguous_prev
    piece_end = np.r_[piece_start[1:], True]
    piece_id = np.cumsum(piece_start) - 1
    # vertices: every kept segment's start, plus the end of each piece's last segment
    vertex_points = [start[kept], end[kept][piece_end]]
    vertex_seg = np.concatenate([np.arange(len(kept)), np.flatnonzero(piece_end)])
    vertex_rank = np.concatenate([np.zeros(len(kept), int), np.ones(piece_end.sum(), int)])
    order = np.lexsort((vertex_rank, vertex_seg))
    vertices = np.concatenate(vertex_points)[order]
    vertex_piece = piece_id[vertex_seg[order]]
    counts = np.bincount(vertex_piece, minlength=piece_id[-1] + 1)
    piece_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    piece_edges = edge_of[piece_start]
    return LineGraph(vertices, piece_offsets, graph.joined[piece_edges], graph.tile[piece_edges])


def is_cut_point(points: np.ndarray) -> np.ndarray:
    """Vertices created by cutting at a block border: a non-integer pixel coordinate."""
    points = np.asarray(points)
    return (points != np.round(points)).any(axis=1)


def drop_interior_cut_points(graph: LineGraph) -> LineGraph:
    """Remove cut points that are no longer ends (their two pieces were merged)."""
    if not graph.num_edges:
        return graph
    interior = np.ones(len(graph.coords), bool)
    interior[graph.offsets[:-1]] = False
    interior[graph.offsets[1:] - 1] = False
    drop = interior & is_cut_point(graph.coords)
    if not drop.any():
        return graph
    keep = ~drop
    edge_of_vertex = np.repeat(np.arange(graph.num_edges), np.diff(graph.offsets))
    counts = np.bincount(edge_of_vertex[keep], minlength=graph.num_edges)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return LineGraph(graph.coords[keep], offsets, graph.joined, graph.tile)


def _start_loops_off_cut_points(graph: LineGraph) -> LineGraph:
    """A closed loop merged from pieces may start at a cut point; start it at a skeleton vertex instead."""
    if not graph.num_edges:
        return graph
    _, u, v, degree = graph.nodes()
    loops = np.flatnonzero((u == v) & (degree[u] == 2))
    if not loops.size:
        return graph
    paths = graph.paths()
    for i in loops:
        ring = paths[i][:-1]
        plain = np.flatnonzero(~is_cut_point(ring))
        if plain.size and plain[0] != 0:
            ring = np.roll(ring, -plain[0], axis=0)
            paths[i] = np.concatenate([ring, ring[:1]])
    return LineGraph.from_paths(paths, graph.joined, graph.tile)


def merge_pieces(pieces: list[LineGraph]) -> LineGraph:
    """One canonical graph from block (or tile) pieces that meet at exact cut points."""
    merged = _start_loops_off_cut_points(dissolve_degree_two(LineGraph.concatenate(pieces)))
    return canonical(drop_interior_cut_points(merged))
