"""Cleaning the centerline graph in metres: prune spurs, join gaps, simplify.

All three take a ``LineGraph`` in a metric frame (``geo.units.metric_frame``) and thresholds in metres.

- ``prune_spurs``: an edge from a free end to a junction (degree >= 3), or an isolated edge, shorter than
  the spur length is removed, the junction dissolved, and again until none is left. Ends listed in
  ``protected`` (where a line leaves the raster or continues in a neighbouring tile) are never free ends.
- ``join_gaps``: each free end may connect to the nearest point of another line within the gap length, if
  that point lies within ``max_angle_deg`` of the end's direction (measured over the last ``direction_m``
  of its edge) and the network offers no path between the two shorter than ``detour_factor`` x the gap:
  another connected component (no path at all), or a gap in a loop (a sidewalk cut by a tree's shadow
  around a block is still connected the long way round). Candidates are taken shortest first against the
  network as joined so far, so a gap is bridged once. A join onto an edge's interior splits that edge.
- ``drop_small_components``: connected pieces shorter in all than a length, none of whose ends is
  protected, are noise (a speckle that survived cleaning), not sidewalks.
- ``simplify``: Douglas-Peucker per edge (shapely, topology preserving; ends kept), then zero-length and
  duplicate edges are dropped.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

from .line_graph import LineGraph, as_keys, canonical, dissolve_degree_two


def to_shapely(graph: LineGraph) -> np.ndarray:
    """The edges as an array of shapely LineStrings."""
    if not graph.num_edges:
        return np.array([], dtype=object)
    indices = np.repeat(np.arange(graph.num_edges), np.diff(graph.offsets))
    return shapely.linestrings(graph.coords, indices=indices)


def free_ends(graph: LineGraph, protected: np.ndarray | None = None):
    """``(node_xy, u, v, degree, is_free)``: a free end is a degree-1 node not in ``protected`` (x, y)."""
    node_xy, u, v, degree = graph.nodes()
    is_free = degree == 1
    if protected is not None and len(protected):
        is_free &= ~np.isin(as_keys(node_xy), as_keys(np.asarray(protected).reshape(-1, 2)))
    return node_xy, u, v, degree, is_free


def find_spurs(graph: LineGraph, spur_length: float, protected: np.ndarray | None = None) -> np.ndarray:
    """Edges that are spurs (a free end and a junction) or isolated pieces shorter than ``spur_length``."""
    if not graph.num_edges:
        return np.zeros(0, bool)
    _, u, v, degree, free = free_ends(graph, protected)
    short = graph.lengths() < spur_length
    spur = (free[u] & (degree[v] >= 3)) | (free[v] & (degree[u] >= 3))
    isolated = free[u] & free[v]
    return short & (spur | isolated)


def prune_spurs(graph: LineGraph, spur_length: float, protected: np.ndarray | None = None) -> LineGraph:
    """Remove spurs shorter than ``spur_length`` until none is left (see the module)."""
    if spur_length <= 0:
        return graph
    while graph.num_edges:
        remove = find_spurs(graph, spur_length, protected)
        if not remove.any():
            break
        graph = dissolve_degree_two(graph.subset(~remove))
    return graph


def _end_directions(graph: LineGraph, u: np.ndarray, v: np.ndarray, free: np.ndarray, direction_m: float):
    """For each free end: (its edge, its point, unit direction out of the line over ``direction_m``)."""
    n = graph.num_edges
    end_node = np.concatenate([u, v])
    end_edge = np.concatenate([np.arange(n), np.arange(n)])
    at_start = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    chosen = np.flatnonzero(free[end_node])
    edges, from_start = end_edge[chosen], at_start[chosen]
    lines = to_shapely(graph)[edges]
    lengths = shapely.length(lines)
    reach = np.minimum(direction_m, lengths)
    inner = shapely.get_coordinates(
        shapely.line_interpolate_point(lines, np.where(from_start, reach, lengths - reach))
    )
    first, last = graph.end_points()
    end_xy = np.where(from_start[:, None], first[edges], last[edges])
    vector = end_xy - inner
    norm = np.linalg.norm(vector, axis=1, keepdims=True)
    return edges, end_xy, np.divide(vector, norm, out=np.zeros_like(vector), where=norm > 0)


def _split_edge(path: np.ndarray, positions: list[tuple[float, np.ndarray]]) -> list[np.ndarray]:
    """Cut a polyline at points lying on it, given with their distance along it."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    pieces, current, vertex = [], [path[0]], 0
    for distance, point in sorted(positions, key=lambda item: item[0]):
        while vertex + 1 < len(path) - 1 and cumulative[vertex + 1] <= distance:
            vertex += 1
            current.append(path[vertex])
        if not np.array_equal(point, current[-1]):
            current.append(point)
        if len(current) >= 2:
            pieces.append(np.array(current))
        current = [point]
    for later in path[vertex + 1 :]:
        if not np.array_equal(later, current[-1]):
            current.append(later)
    if len(current) >= 2:
        pieces.append(np.array(current))
    return pieces


def _network_of(graph: LineGraph, u: np.ndarray, v: np.ndarray, lengths: np.ndarray):
    """The graph as networkx, node ids as in ``graph.nodes()``, the shortest of parallel edges kept."""
    import networkx as nx

    network = nx.Graph()
    for a, b, length in zip(u.tolist(), v.tolist(), lengths.tolist()):
        if a != b and (not network.has_edge(a, b) or network[a][b]["weight"] > length):
            network.add_edge(a, b, weight=length)
    return network


def join_gaps(
    graph: LineGraph,
    gap_length: float,
    max_angle_deg: float = 45.0,
    detour_factor: float = 4.0,
    direction_m: float = 3.0,
    protected: np.ndarray | None = None,
) -> LineGraph:
    """Connect free ends across gaps shorter than ``gap_length`` (see the module)."""
    import networkx as nx

    if gap_length <= 0 or graph.num_edges < 1:
        return graph
    _, u, v, _, free = free_ends(graph, protected)
    if not free.any():
        return graph
    edges, end_xy, direction = _end_directions(graph, u, v, free, direction_m)
    end_node = np.where((graph.end_points()[0][edges] == end_xy).all(axis=1), u[edges], v[edges])
    lines = to_shapely(graph)
    tree = shapely.STRtree(lines)
    end_points = shapely.points(end_xy)
    end_index, line_index = tree.query(end_points, predicate="dwithin", distance=gap_length)
    # on an end's own edge only the part farther along it than any accepted detour can be a target
    own = line_index == edges[end_index]
    search = lines[line_index].copy()
    start_offset = np.zeros(len(line_index))
    if own.any():
        from shapely.ops import substring

        reach_m = detour_factor * gap_length
        own_lengths = shapely.length(search[own])
        from_start = (graph.end_points()[0][edges[end_index[own]]] == end_xy[end_index[own]]).all(axis=1)
        subs = []
        for line, length, at_start in zip(search[own], own_lengths, from_start):
            if length <= reach_m:
                subs.append(shapely.LineString())
            else:
                subs.append(
                    substring(line, reach_m, length) if at_start else substring(line, 0, length - reach_m)
                )
        search[own] = subs
        start_offset[own] = np.where(from_start, reach_m, 0.0)
    usable = ~shapely.is_empty(search)
    end_index, line_index, search, start_offset = (
        end_index[usable],
        line_index[usable],
        search[usable],
        start_offset[usable],
    )
    if not end_index.size:
        return graph
    along = shapely.line_locate_point(search, end_points[end_index])
    target = shapely.get_coordinates(shapely.line_interpolate_point(search, along))
    along = along + start_offset
    first, last = graph.end_points()
    line_length = shapely.length(lines[line_index])
    at_first, at_last = along <= 0, along >= line_length
    target = np.where(at_first[:, None], first[line_index], target)  # an edge's end is that node exactly
    target = np.where(at_last[:, None], last[line_index], target)
    offset = target - end_xy[end_index]
    distance = np.linalg.norm(offset, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (offset * direction[end_index]).sum(axis=1) / distance
    ok = (distance > 0) & (distance <= gap_length) & (cosine >= math.cos(math.radians(max_angle_deg)))
    candidates = np.flatnonzero(ok)
    candidates = candidates[np.lexsort((line_index[candidates], end_index[candidates], distance[candidates]))]
    if not candidates.size:
        return graph

    network = _network_of(graph, u, v, graph.lengths())
    used_end = np.zeros(len(edges), bool)
    splits: dict[int, list[tuple[float, np.ndarray]]] = {}
    join_paths, join_tiles = [], []
    next_node = len(graph.nodes()[0])
    for c in candidates:
        e, line = end_index[c], line_index[c]
        if used_end[e]:
            continue
        limit = detour_factor * distance[c]
        reach = nx.single_source_dijkstra_path_length(
            network, int(end_node[e]), cutoff=limit, weight="weight"
        )
        a, b = int(u[line]), int(v[line])
        if at_first[c]:
            via_network = reach.get(a, math.inf)
        elif at_last[c]:
            via_network = reach.get(b, math.inf)
        else:
            via_network = min(
                reach.get(a, math.inf) + along[c], reach.get(b, math.inf) + line_length[c] - along[c]
            )
        if via_network <= limit:
            continue
        used_end[e] = True
        point = target[c]
        if at_first[c] or at_last[c]:
            target_node = a if at_first[c] else b
            ends_here = np.flatnonzero(end_node == target_node)
            used_end[ends_here] = True  # two ends facing each other: one join
        else:
            target_node = next_node
            next_node += 1
            splits.setdefault(int(line), []).append((float(along[c]), point))
            network.add_edge(a, target_node, weight=float(along[c]))
            network.add_edge(target_node, b, weight=float(line_length[c] - along[c]))
        network.add_edge(int(end_node[e]), target_node, weight=float(distance[c]))
        join_paths.append(np.array([end_xy[e], point]))
        join_tiles.append(graph.tile[edges[e]])
    if not join_paths:
        return graph
    untouched = np.setdiff1d(np.arange(graph.num_edges), np.array(sorted(splits), dtype=np.int64))
    split_paths, split_joined, split_tiles = [], [], []
    for line, positions in splits.items():
        for piece in _split_edge(graph.edge(line), positions):
            split_paths.append(piece)
            split_joined.append(graph.joined[line])
            split_tiles.append(graph.tile[line])
    return LineGraph.concatenate(
        [
            graph.subset(untouched),
            LineGraph.from_paths(split_paths, split_joined, split_tiles),
            LineGraph.from_paths(join_paths, np.ones(len(join_paths), bool), join_tiles),
        ]
    )


def drop_small_components(
    graph: LineGraph, min_length: float, protected: np.ndarray | None = None
) -> LineGraph:
    """Remove connected components shorter than ``min_length`` in total, unless one of their ends is
    protected (the piece continues beyond the tile)."""
    if min_length <= 0 or not graph.num_edges:
        return graph
    components = graph.components()
    total = np.bincount(components, weights=graph.lengths())
    keep_component = total >= min_length
    if protected is not None and len(protected):
        node_xy, u, v, _ = graph.nodes()
        is_protected = np.isin(as_keys(node_xy), as_keys(np.asarray(protected).reshape(-1, 2)))
        touching = is_protected[u] | is_protected[v]
        keep_component[np.unique(components[touching])] = True
    return graph.subset(keep_component[components])


def simplify(graph: LineGraph, tolerance: float) -> LineGraph:
    """Douglas-Peucker per edge, then no zero-length or duplicate edges; canonical order."""
    if not graph.num_edges:
        return graph
    lines = to_shapely(graph)
    if tolerance > 0:
        lines = shapely.simplify(lines, tolerance, preserve_topology=True)
    keep = shapely.length(lines) > 0
    normalized = shapely.to_wkb(shapely.normalize(lines))
    _, first = np.unique(normalized, return_index=True)
    unique = np.zeros(len(lines), bool)
    unique[first] = True
    keep &= unique
    paths = [shapely.get_coordinates(line) for line in lines[keep]]
    return canonical(LineGraph.from_paths(paths, graph.joined[keep], graph.tile[keep]))
