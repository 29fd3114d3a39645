"""Skeletonization and the graph of a skeleton: nodes at junctions and ends, edges with their pixel paths.

Written by hand because the builder others use (``sknw``) stores node ids in 16 bits and overflows above
about 65,000 nodes, and walks pixels one at a time in Python. Here every step is an array operation:

- a skeleton pixel with other than 2 neighbours (8-connected) is a node pixel; adjacent node pixels form
  one node (a junction of several pixels, a 2 x 2 blob, an end touching a junction), placed on its pixel
  nearest the cluster's centroid (ties: first in row-major order);
- a closed loop of 2-neighbour pixels with no node gets one at its first pixel in row-major order;
- the 2-neighbour pixels between nodes are ordered by list ranking (pointer doubling over "arrived from
  this neighbour" states, log2(longest path) rounds), each path kept in one direction.

An edge's polyline is node pixel, path pixels, node pixel, in pixel coordinates (x = column, y = row of
pixel centres, offset by the window's origin); ids are int64 and nothing limits their number.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from skimage.morphology import skeletonize

from .line_graph import LineGraph

NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
MIN_SELF_LOOP_PIXELS = 3  # a loop from a node back to it through fewer pixels is a thinning artefact


def skeleton_of(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide skeleton (Zhang-Suen thinning, scikit-image). Thinning is local: a pixel's result
    depends only on pixels within the thinned object's half-width, which is what lets blocks with a halo
    reproduce the skeleton of the whole raster."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return skeletonize(mask)


def _components(pairs_a: np.ndarray, pairs_b: np.ndarray, n: int) -> np.ndarray:
    matrix = sparse.coo_matrix((np.ones(len(pairs_a), np.int8), (pairs_a, pairs_b)), shape=(n, n))
    return connected_components(matrix, directed=False)[1].astype(np.int64)


def skeleton_graph(skeleton: np.ndarray, origin: tuple[int, int] = (0, 0)) -> LineGraph:
    """The graph of a skeleton image; ``origin`` is the (row, column) of its top-left pixel in the raster.

    Node pixels without any path (isolated pixels, lone blobs) give no edge.
    """
    skeleton = np.asarray(skeleton, dtype=bool)
    height, width = skeleton.shape
    rows, cols = np.nonzero(skeleton)
    n = rows.size
    if n == 0:
        return LineGraph()
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    linear = rows * width + cols  # sorted: np.nonzero walks in row-major order

    neighbours = np.full((n, 8), -1, dtype=np.int64)
    for k, (dr, dc) in enumerate(NEIGHBOUR_OFFSETS):
        r2, c2 = rows + dr, cols + dc
        inside = (r2 >= 0) & (r2 < height) & (c2 >= 0) & (c2 < width)
        present = np.zeros(n, bool)
        present[inside] = skeleton[r2[inside], c2[inside]]
        neighbours[present, k] = np.searchsorted(linear, (r2 * width + c2)[present])
    degree = (neighbours >= 0).sum(axis=1)
    is_node = degree != 2

    # closed loops of path pixels: give each a node at its first pixel
    src, slot = np.nonzero(neighbours >= 0)
    dst = neighbours[src, slot]
    path_pair = ~is_node[src] & ~is_node[dst]
    path_labels = _components(src[path_pair], dst[path_pair], n)
    touches_node = np.zeros(n, bool)
    touches_node[src[~is_node[src] & is_node[dst]]] = True
    label_touches = np.zeros(n, bool)
    np.logical_or.at(label_touches, path_labels[~is_node], touches_node[~is_node])
    loop_pixels = np.flatnonzero(~is_node & ~label_touches[path_labels])
    if loop_pixels.size:
        first_of_loop = np.full(n, n, dtype=np.int64)
        np.minimum.at(first_of_loop, path_labels[loop_pixels], loop_pixels)
        is_node[np.unique(first_of_loop[path_labels[loop_pixels]])] = True

    # clusters of adjacent node pixels, each placed on its pixel nearest the centroid
    node_pair = is_node[src] & is_node[dst]
    cluster = _components(src[node_pair], dst[node_pair], n)
    node_pixels = np.flatnonzero(is_node)
    node_cluster = cluster[node_pixels]
    count = np.bincount(node_cluster, minlength=n).astype(np.float64)
    safe = np.maximum(count, 1)
    centre_r = np.bincount(node_cluster, rows[node_pixels], minlength=n) / safe
    centre_c = np.bincount(node_cluster, cols[node_pixels], minlength=n) / safe
    distance = (rows[node_pixels] - centre_r[node_cluster]) ** 2 + (
        cols[node_pixels] - centre_c[node_cluster]
    ) ** 2
    order = np.lexsort((node_pixels, distance, node_cluster))
    first = np.r_[True, node_cluster[order][1:] != node_cluster[order][:-1]]
    representative = np.full(n, -1, dtype=np.int64)
    representative[node_cluster[order][first]] = node_pixels[order][first]

    path_pixels = np.flatnonzero(~is_node)
    if path_pixels.size == 0:
        return LineGraph()
    m = path_pixels.size
    path_index = np.full(n, -1, dtype=np.int64)
    path_index[path_pixels] = np.arange(m)
    pair_src, pair_slot = np.nonzero(neighbours[path_pixels] >= 0)
    both = neighbours[path_pixels][pair_src, pair_slot].reshape(m, 2)  # the two neighbours of each

    # state 2i + j: at path pixel i, arrived from neighbour j, leaving towards neighbour 1 - j
    state = np.arange(2 * m, dtype=np.int64)
    here, came = state // 2, state % 2
    target = both[here, 1 - came]
    target_path = path_index[target]
    terminal = target_path < 0
    successor = state.copy()
    onward = ~terminal
    target_i = target_path[onward]
    arrive_slot = (both[target_i, 1] == path_pixels[here[onward]]).astype(np.int64)
    successor[onward] = 2 * target_i + arrive_slot
    rank = onward.astype(np.int64)
    pointer = successor
    while True:  # Wyllie's list ranking
        nxt = pointer[pointer]
        if np.array_equal(nxt, pointer):
            break
        rank = rank + rank[pointer]
        pointer = nxt
    end_state = pointer  # the terminal state each state leads to

    start_state = is_node[both[here, came]]
    starts = np.flatnonzero(start_state)
    start_terminal = end_state[starts]
    first_pixel, last_pixel = here[starts], here[start_terminal]
    start_cluster = cluster[both[first_pixel, came[starts]]]
    end_cluster = cluster[both[last_pixel, 1 - came[start_terminal]]]
    single = first_pixel == last_pixel
    keep = np.where(
        single,
        start_cluster < end_cluster,
        path_pixels[first_pixel] < path_pixels[last_pixel],
    )
    length = rank[starts] + 1
    keep &= ~((start_cluster == end_cluster) & (length < MIN_SELF_LOOP_PIXELS))
    starts, start_terminal = starts[keep], start_terminal[keep]
    start_cluster, end_cluster, length = start_cluster[keep], end_cluster[keep], length[keep]
    if starts.size == 0:
        return LineGraph()

    # every state of a kept direction, in walking order: sort by (terminal, decreasing rank)
    kept_terminal = np.zeros(2 * m, bool)
    kept_terminal[start_terminal] = True
    members = np.flatnonzero(kept_terminal[end_state])
    order = np.lexsort((-rank[members], end_state[members]))
    members = members[order]
    # edges in the order of their terminal state; path e's pixels are a contiguous run of ``members``
    edge_order = np.argsort(start_terminal)
    start_cluster, end_cluster, length = (
        start_cluster[edge_order],
        end_cluster[edge_order],
        length[edge_order],
    )
    e = len(edge_order)
    vertex_count = length + 2
    offsets = np.concatenate([[0], np.cumsum(vertex_count)]).astype(np.int64)
    pixel_of_vertex = np.empty(offsets[-1], dtype=np.int64)
    body = np.ones(offsets[-1], bool)
    body[offsets[:-1]] = False
    body[offsets[1:] - 1] = False
    pixel_of_vertex[body] = path_pixels[here[members]]
    pixel_of_vertex[offsets[:-1]] = representative[start_cluster]
    pixel_of_vertex[offsets[1:] - 1] = representative[end_cluster]
    coords = np.column_stack([cols[pixel_of_vertex] + origin[1], rows[pixel_of_vertex] + origin[0]]).astype(
        np.float64
    )
    return LineGraph(coords, offsets, np.zeros(e, bool), np.zeros(e, np.int32))
