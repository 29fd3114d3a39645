"""The network as a graph of polylines whose nodes are their distinct end coordinates.

Nodes are identified by exact coordinates, never by ids handed out per block, so pieces built in
different blocks or tiles join where their ends coincide bit for bit. Ids, when needed, are int64 from
``np.unique`` and there is no limit on their number. The canonical form (``canonical``) makes two graphs
with the same lines compare equal array by array: no node of degree 2 except the one vertex of a closed
loop (its lexicographically smallest vertex), edges oriented and sorted by their vertices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components


@dataclass
class LineGraph:
    """Edges as polylines: edge ``i`` is ``coords[offsets[i]:offsets[i + 1]]`` (x, y), at least 2 vertices.

    ``joined`` marks edges added by gap joining; ``tile`` is an index into the run's tile names.
    """

    coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    joined: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    tile: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def num_edges(self) -> int:
        return len(self.offsets) - 1

    def edge(self, i: int) -> np.ndarray:
        return self.coords[self.offsets[i] : self.offsets[i + 1]]

    def paths(self) -> list[np.ndarray]:
        return [self.edge(i) for i in range(self.num_edges)]

    @classmethod
    def from_paths(cls, paths, joined=None, tile=None) -> LineGraph:
        paths = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in paths]
        lengths = np.array([len(p) for p in paths], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        coords = np.concatenate(paths) if paths else np.zeros((0, 2))
        n = len(paths)
        return cls(
            coords,
            offsets,
            np.zeros(n, bool) if joined is None else np.asarray(joined, bool),
            np.zeros(n, np.int32) if tile is None else np.asarray(tile, np.int32),
        )

    @classmethod
    def concatenate(cls, graphs: list[LineGraph]) -> LineGraph:
        graphs = [g for g in graphs if g.num_edges]
        if not graphs:
            return cls()
        coords = np.concatenate([g.coords for g in graphs])
        starts = np.cumsum([0] + [len(g.coords) for g in graphs[:-1]])
        offsets = np.concatenate([[0]] + [g.offsets[1:] + s for g, s in zip(graphs, starts)])
        return cls(
            coords,
            offsets.astype(np.int64),
            np.concatenate([g.joined for g in graphs]),
            np.concatenate([g.tile for g in graphs]),
        )

    def subset(self, keep: np.ndarray) -> LineGraph:
        keep = np.asarray(keep)
        if keep.dtype == bool:
            keep = np.flatnonzero(keep)
        return (
            LineGraph.from_paths([self.edge(i) for i in keep], self.joined[keep], self.tile[keep])
            if len(keep)
            else LineGraph()
        )

    def map_coords(self, fn) -> LineGraph:
        """The same graph with every vertex mapped by ``fn(x, y) -> (x, y)`` (vectorised)."""
        x, y = fn(self.coords[:, 0], self.coords[:, 1])
        return LineGraph(
            np.column_stack([x, y]).astype(np.float64), self.offsets.copy(), self.joined, self.tile
        )

    def lengths(self) -> np.ndarray:
        """Euclidean length of every edge in coordinate units."""
        steps = np.linalg.norm(np.diff(self.coords, axis=0), axis=1)
        inside = np.ones(len(steps), bool)
        inside[self.offsets[1:-1] - 1] = False  # the step from one edge's last vertex to the next's first
        cumulative = np.concatenate([[0.0], np.cumsum(np.where(inside, steps, 0.0))])
        return cumulative[self.offsets[1:] - 1] - cumulative[self.offsets[:-1]]

    def end_points(self) -> tuple[np.ndarray, np.ndarray]:
        return self.coords[self.offsets[:-1]], self.coords[self.offsets[1:] - 1]

    def nodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(node_xy, u, v, degree)``: distinct end coordinates, each edge's end node ids (int64), degrees
        (a loop counts twice)."""
        first, last = self.end_points()
        keys = np.concatenate([as_keys(first), as_keys(last)])
        unique, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.astype(np.int64)
        n = self.num_edges
        degree = np.bincount(inverse, minlength=len(unique))
        return np.column_stack([unique.real, unique.imag]), inverse[:n], inverse[n:], degree

    def components(self) -> np.ndarray:
        """Connected component id of every edge, numbered in order of first appearance."""
        if not self.num_edges:
            return np.zeros(0, np.int64)
        node_xy, u, v, _ = self.nodes()
        matrix = sparse.coo_matrix((np.ones(len(u)), (u, v)), shape=(len(node_xy),) * 2)
        _, labels = connected_components(matrix, directed=False)
        edge_labels = labels[u]
        _, first_seen, inverse = np.unique(edge_labels, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first_seen))
        return order[inverse].astype(np.int64)

    def num_components(self) -> int:
        return int(self.components().max() + 1) if self.num_edges else 0


def as_keys(points: np.ndarray) -> np.ndarray:
    """Exact (x, y) -> complex keys: equal keys iff equal coordinates; sorting is lexicographic."""
    points = np.asarray(points, dtype=np.float64)
    return points[:, 0] + 1j * points[:, 1]


def dissolve_degree_two(graph: LineGraph) -> LineGraph:
    """Merge the edges meeting at nodes of degree 2 into one (never a joined edge with a plain one)."""
    if graph.num_edges < 2:
        return graph
    node_xy, u, v, degree = graph.nodes()
    n = graph.num_edges
    ends_node = np.concatenate([u, v])
    ends_edge = np.concatenate([np.arange(n), np.arange(n)])
    order = np.argsort(ends_node, kind="stable")
    sorted_nodes = ends_node[order]
    # a node of degree 2 appears twice in a row in ``sorted_nodes``: pair its two edge ends
    pair_start = np.flatnonzero((degree[sorted_nodes[:-1]] == 2) & (sorted_nodes[:-1] == sorted_nodes[1:]))
    e1, e2 = ends_edge[order[pair_start]], ends_edge[order[pair_start + 1]]
    link = (e1 != e2) & (graph.joined[e1] == graph.joined[e2])
    if not link.any():
        return graph
    e1, e2 = e1[link], e2[link]
    matrix = sparse.coo_matrix((np.ones(len(e1)), (e1, e2)), shape=(n, n))
    count, labels = connected_components(matrix, directed=False)
    group_size = np.bincount(labels, minlength=count)
    untouched = group_size[labels] == 1
    linked_nodes = np.zeros(len(node_xy), bool)
    linked_nodes[ends_node[order[pair_start]][link]] = True

    incident: dict[int, list[tuple[int, int]]] = {}
    for side, nodes_of_side in ((0, u), (1, v)):
        for e in np.flatnonzero(~untouched):
            node = int(nodes_of_side[e])
            if linked_nodes[node]:
                incident.setdefault(node, []).append((int(e), side))

    paths, joined, tile = [], [], []
    keep = np.flatnonzero(untouched)
    members_by_group: dict[int, list[int]] = {}
    for e in np.flatnonzero(~untouched):
        members_by_group.setdefault(int(labels[e]), []).append(int(e))
    for members in members_by_group.values():
        start_edge, start_side = None, 0
        for e in members:  # an end at a node that is not dissolved starts an open chain
            if not linked_nodes[u[e]]:
                start_edge, start_side = e, 0
                break
            if not linked_nodes[v[e]]:
                start_edge, start_side = e, 1
                break
        closed = start_edge is None
        if closed:
            start_edge = min(members)
        pieces, edge, side = [], start_edge, start_side
        while True:
            coords = graph.edge(edge)
            coords = coords if side == 0 else coords[::-1]
            pieces.append(coords if not pieces else coords[1:])
            far_node = int(v[edge] if side == 0 else u[edge])
            if not linked_nodes[far_node]:
                break
            (e_a, s_a), (e_b, s_b) = incident[far_node]
            nxt = (e_b, s_b) if (e_a, s_a) == (edge, 1 - side) else (e_a, s_a)
            if nxt[0] == start_edge:
                break
            edge, side = nxt
        paths.append(np.concatenate(pieces))
        joined.append(graph.joined[start_edge])
        tile.append(graph.tile[start_edge])
    return LineGraph.concatenate([graph.subset(keep), LineGraph.from_paths(paths, joined, tile)])


def _orient_and_rotate(path: np.ndarray, pure_loop: bool) -> np.ndarray:
    if pure_loop:
        ring = path[:-1]
        keys = as_keys(ring)
        start = int(np.lexsort((keys.imag, keys.real))[0])
        ring = np.roll(ring, -start, axis=0)
        path = np.concatenate([ring, ring[:1]])
    first, last = tuple(path[0]), tuple(path[-1])
    if first > last:
        return path[::-1].copy()
    if first == last and len(path) > 2 and tuple(path[1]) > tuple(path[-2]):
        return path[::-1].copy()
    return path


def canonical(graph: LineGraph) -> LineGraph:
    """Degree-2 nodes dissolved, closed loops started at their smallest vertex, edges oriented from
    their smaller end and sorted; two graphs of the same lines then have equal arrays."""
    graph = dissolve_degree_two(graph)
    if not graph.num_edges:
        return graph
    _, u, v, degree = graph.nodes()
    pure_loop = (u == v) & (degree[u] == 2)
    paths = [_orient_and_rotate(graph.edge(i), bool(pure_loop[i])) for i in range(graph.num_edges)]
    keys = [tuple(p[0]) + tuple(p[1]) + tuple(p[-1]) + (len(p),) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: keys[i])
    return LineGraph.from_paths([paths[i] for i in order], graph.joined[order], graph.tile[order])
