"""Scoring a centerline network against the truth: any two line layers, and clDice for two masks.

Both layers are first put in one metric frame (the projected CRS of either, in metres, else the local UTM
zone) and *noded*: lines are split where they cross or where an end touches another line (ends within
``snap_m`` of a line are extended onto it; the stubs this leaves are dropped), so that a truth layer drawn
as long crossing polylines and a predicted graph are compared as graphs.

Definitions:

- **Completeness, correctness, quality** at a buffer width b (Wiedemann, Heipke, Mayer & Jamet, "Empirical
  evaluation of automatically extracted road axes", 1998): completeness = length of truth within b of the
  prediction / truth length; correctness = length of prediction within b of the truth / prediction length;
  quality = completeness x correctness / (completeness - completeness x correctness + correctness), i.e.
  matched / (matched + missed + spurious).
- **APLS**, Average Path Length Similarity (Van Etten, Shermeyer, Hogan et al., "SpaceNet: A Remote Sensing
  Dataset and Challenge Series", 2018, and the SpaceNet 3 road challenge): control points are added along
  every edge every ``control_spacing_m`` (plus junctions and ends); each control point of the first graph
  is snapped to the nearest point of the second within ``snap_m`` (inserted there as a node). For pairs of
  control points (a, b) with a path in the first graph, the pair scores
  1 - min(1, |L(a, b) - L(a', b')| / L(a, b)), L being shortest-path lengths and a', b' the snapped points;
  a point without a snap or a pair without a path in the second graph scores 0. The mean over pairs (from
  at most ``max_sources`` sources, all targets) is computed truth -> prediction and prediction -> truth;
  APLS is their harmonic mean.
- **Junction precision / recall**: junctions are nodes of degree >= 3 of the noded graph; predicted and true
  junctions are matched one to one, nearest first, within ``junction_radius_m``.
- **Components**: connected components of each noded graph.
- **clDice** (Shit, Paetzold, Sekuboyina et al., "clDice - a Novel Topology-Preserving Loss Function for
  Tubular Structure Segmentation", CVPR 2021): with skeletons S of the masks V, Tprec = |S_pred ∩ V_true| /
  |S_pred|, Tsens = |S_true ∩ V_pred| / |S_true|, clDice = 2 Tprec Tsens / (Tprec + Tsens); pixels that are
  nodata in either mask are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import shapely
from scipy import sparse
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree


class LayerError(ValueError):
    """A line layer that cannot be scored; the message names the file."""


# --------------------------------------------------------------------------- reading and frames


def read_lines(path: str | os.PathLike) -> tuple[np.ndarray, object]:
    """``(LineStrings, pyproj CRS)`` of a GeoJSON (RFC 7946 lon/lat, or a ``crs`` member), GeoPackage or any
    layer GDAL reads; multi-lines are split into lines."""
    from pyproj import CRS

    path = Path(path)
    if not path.exists():
        raise LayerError(f"{path}: no such file")
    if path.suffix.lower() in (".geojson", ".json"):
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise LayerError(f"{path}: not valid JSON ({error})") from None
        crs_name = (document.get("crs") or {}).get("properties", {}).get("name", "EPSG:4326")
        features = document.get("features", [])
        geoms = [shapely.geometry.shape(f["geometry"]) for f in features if f.get("geometry")]
        crs = CRS.from_user_input(crs_name)
    else:
        from pyogrio.raw import read

        meta, _, wkb, _ = read(str(path))
        geoms = list(shapely.from_wkb(wkb)) if wkb is not None else []
        crs = CRS.from_user_input(meta["crs"] or "EPSG:4326")
    geoms = np.array(geoms, dtype=object)
    if len(geoms):
        geoms = shapely.get_parts(geoms)
        geoms = geoms[np.isin(shapely.get_type_id(geoms), [1, 2])]  # LineString, LinearRing
    return geoms, crs


def common_metric_frame(crs_a, crs_b, sample_lines: np.ndarray):
    """A metric CRS for both layers and the factor from its unit to metres."""
    from ..geo.units import metres_per_unit, utm_crs_for

    for crs in (crs_b, crs_a):
        if crs.is_projected:
            return crs, metres_per_unit(crs)
    centre = shapely.centroid(shapely.union_all(sample_lines)) if len(sample_lines) else shapely.Point(0, 0)
    return utm_crs_for(centre.x, centre.y), 1.0


def to_metric(lines: np.ndarray, crs, metric_crs, unit_m: float) -> np.ndarray:
    from pyproj import Transformer

    if not len(lines):
        return lines
    transformer = Transformer.from_crs(crs, metric_crs, always_xy=True)

    def fn(xy):
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([np.asarray(x) * unit_m, np.asarray(y) * unit_m])

    return shapely.transform(lines, fn)


# --------------------------------------------------------------------------- noding and graphs


def node_lines(lines: np.ndarray, snap_m: float = 0.05) -> np.ndarray:
    """Lines split at crossings and where an end touches another line (see the module)."""
    lines = np.asarray(lines, dtype=object)
    lines = lines[~shapely.is_empty(lines) & (shapely.length(lines) > 0)] if len(lines) else lines
    if not len(lines):
        return lines
    if snap_m > 0 and len(lines) > 1:
        tree = shapely.STRtree(lines)
        extended = []
        for i, line in enumerate(lines):
            coords = shapely.get_coordinates(line)
            for end, inner in ((0, 1), (-1, -2)):
                point = shapely.Point(coords[end])
                hits = tree.query(point, predicate="dwithin", distance=snap_m)
                if np.any(hits != i):
                    direction = coords[end] - coords[inner]
                    norm = np.linalg.norm(direction)
                    if norm > 0:
                        coords = coords.copy()
                        coords[end] = coords[end] + direction / norm * 2 * snap_m
            extended.append(shapely.linestrings(coords))
        lines = np.array(extended, dtype=object)
    parts = shapely.get_parts(shapely.union_all(lines))
    if snap_m > 0:
        for _ in range(2):  # the stubs left by extending ends
            _, u, v, degree = _node_ids(parts)
            stub = (shapely.length(parts) <= 3 * snap_m) & ((degree[u] == 1) | (degree[v] == 1))
            if not stub.any():
                break
            parts = parts[~stub]
    return parts


def _node_ids(parts: np.ndarray):
    starts = shapely.get_coordinates(shapely.get_point(parts, 0))
    ends = shapely.get_coordinates(shapely.get_point(parts, -1))
    keys = np.concatenate([starts[:, 0] + 1j * starts[:, 1], ends[:, 0] + 1j * ends[:, 1]])
    unique, inverse = np.unique(keys, return_inverse=True)
    n = len(parts)
    degree = np.bincount(inverse, minlength=len(unique))
    return np.column_stack([unique.real, unique.imag]), inverse[:n], inverse[n:], degree


def count_components(parts: np.ndarray) -> int:
    if not len(parts):
        return 0
    node_xy, u, v, _ = _node_ids(parts)
    matrix = sparse.coo_matrix((np.ones(len(u)), (u, v)), shape=(len(node_xy),) * 2)
    return int(connected_components(matrix, directed=False)[0])


def junctions(parts: np.ndarray) -> np.ndarray:
    if not len(parts):
        return np.zeros((0, 2))
    node_xy, _, _, degree = _node_ids(parts)
    return node_xy[degree >= 3]


class PointGraph:
    """A noded line layer with extra nodes at given distances along its parts, as a sparse graph."""

    def __init__(self, parts: np.ndarray, spacing_m: float, extra: dict[int, list[float]] | None = None):
        self.parts = parts
        node_xy, u, v, _ = _node_ids(parts) if len(parts) else (np.zeros((0, 2)), [], [], [])
        coords = [node_xy]
        count = len(node_xy)
        rows, cols, weights = [], [], []
        self.control = list(range(count))
        self.extra_nodes: dict[tuple[int, float], int] = {}
        extra = extra or {}
        lengths = shapely.length(parts) if len(parts) else []
        for i, part in enumerate(parts):
            length = float(lengths[i])
            control = list(np.arange(spacing_m, length - 1e-9, spacing_m)) if spacing_m > 0 else []
            stops = sorted(set([d for d in control] + [d for d in extra.get(i, []) if 0 < d < length]))
            ids = [int(u[i])]
            if stops:
                points = shapely.get_coordinates(shapely.line_interpolate_point(part, np.array(stops)))
                coords.append(points)
                new = list(range(count, count + len(stops)))
                count += len(stops)
                control_set = set(control)
                for d, node in zip(stops, new):
                    if d in control_set:
                        self.control.append(node)
                    self.extra_nodes[(i, d)] = node
                ids += new
            ids.append(int(v[i]))
            distances = [0.0] + stops + [length]
            for a, b, da, db in zip(ids[:-1], ids[1:], distances[:-1], distances[1:]):
                rows.append(a)
                cols.append(b)
                weights.append(max(db - da, 1e-9))
        self.xy = np.concatenate(coords) if coords else np.zeros((0, 2))
        self.matrix = _symmetric_min(rows, cols, weights, len(self.xy))
        self.control = np.array(sorted(set(self.control)), dtype=np.int64)


def _symmetric_min(rows, cols, weights, n):
    """Undirected adjacency keeping the shortest of parallel edges."""
    if not rows:
        return sparse.csr_matrix((n, n))
    r = np.concatenate([rows, cols])
    c = np.concatenate([cols, rows])
    w = np.concatenate([weights, weights])
    order = np.lexsort((w, c, r))
    r, c, w = r[order], c[order], w[order]
    first = np.r_[True, (r[1:] != r[:-1]) | (c[1:] != c[:-1])]
    return sparse.coo_matrix((w[first], (r[first], c[first])), shape=(n, n)).tocsr()


def _snap(points: np.ndarray, parts: np.ndarray, snap_m: float):
    """For each point: (part index, distance along) of the nearest point of ``parts`` within snap_m."""
    result = [None] * len(points)
    if not len(parts) or not len(points):
        return result
    tree = shapely.STRtree(parts)
    geoms = shapely.points(points)
    point_index, part_index = tree.query_nearest(geoms, max_distance=snap_m, all_matches=False)
    along = shapely.line_locate_point(parts[part_index], geoms[point_index])
    for p, part, d in zip(point_index, part_index, along):
        result[int(p)] = (int(part), float(d))
    return result


def _apls_one_way(
    first: np.ndarray,
    second: np.ndarray,
    spacing_m: float,
    snap_m: float,
    max_sources: int,
    min_path_m: float,
    seed: int,
) -> float:
    graph_a = PointGraph(first, spacing_m)
    if not len(graph_a.control):
        return float("nan")
    snaps = _snap(graph_a.xy[graph_a.control], second, snap_m)
    lengths_b = shapely.length(second) if len(second) else []
    extra: dict[int, list[float]] = {}
    for s in snaps:
        if s is not None and 0 < s[1] < lengths_b[s[0]]:
            extra.setdefault(s[0], []).append(s[1])
    graph_b = PointGraph(second, 0.0, extra)
    node_b_xy = (
        {tuple(xy): k for k, xy in enumerate(graph_b.xy[: len(_node_ids(second)[0])])} if len(second) else {}
    )
    snapped = np.full(len(graph_a.control), -1, dtype=np.int64)
    for k, s in enumerate(snaps):
        if s is None:
            continue
        part, d = s
        if (part, d) in graph_b.extra_nodes:
            snapped[k] = graph_b.extra_nodes[(part, d)]
        else:
            end = shapely.get_coordinates(shapely.get_point(second[part], 0 if d <= 0 else -1))[0]
            snapped[k] = node_b_xy[tuple(end)]
    rng = np.random.default_rng(seed)
    sources = np.arange(len(graph_a.control))
    if len(sources) > max_sources:
        sources = np.sort(rng.choice(sources, max_sources, replace=False))
    dist_a = dijkstra(graph_a.matrix, directed=False, indices=graph_a.control[sources])[:, graph_a.control]
    scores = []
    valid_b = snapped >= 0
    if valid_b.any():
        sources_b = snapped[sources]
        has_b = sources_b >= 0
        dist_b = np.full((len(sources), len(graph_a.control)), np.inf)
        if has_b.any():
            rows = dijkstra(graph_b.matrix, directed=False, indices=sources_b[has_b])
            block = np.full((has_b.sum(), len(graph_a.control)), np.inf)
            block[:, valid_b] = rows[:, snapped[valid_b]]
            dist_b[has_b] = block
    else:
        dist_b = np.full((len(sources), len(graph_a.control)), np.inf)
    pair = np.isfinite(dist_a) & (dist_a >= min_path_m)
    if not pair.any():
        return float("nan")
    la, lb = dist_a[pair], dist_b[pair]
    with np.errstate(invalid="ignore"):
        score = 1.0 - np.minimum(1.0, np.abs(la - lb) / la)
    score[~np.isfinite(lb)] = 0.0
    scores.append(score)
    return float(np.concatenate(scores).mean())


def apls(
    truth: np.ndarray,
    pred: np.ndarray,
    control_spacing_m: float = 5.0,
    snap_m: float = 2.0,
    max_sources: int = 200,
    seed: int = 0,
) -> dict:
    """APLS of two noded metric layers (see the module): both directions and their harmonic mean."""
    min_path_m = control_spacing_m
    gt_to_pred = _apls_one_way(truth, pred, control_spacing_m, snap_m, max_sources, min_path_m, seed)
    pred_to_gt = _apls_one_way(pred, truth, control_spacing_m, snap_m, max_sources, min_path_m, seed)
    values = [gt_to_pred, pred_to_gt]
    if any(np.isnan(values)):
        total = 0.0 if not len(pred) or not len(truth) else float(np.nanmean(values))
    elif min(values) <= 0:
        total = 0.0
    else:
        total = 2.0 / (1.0 / gt_to_pred + 1.0 / pred_to_gt)
    return {"apls": total, "apls_truth_to_pred": gt_to_pred, "apls_pred_to_truth": pred_to_gt}


# --------------------------------------------------------------------------- the other scores


def buffer_scores(truth: np.ndarray, pred: np.ndarray, buffer_m: float) -> dict:
    """Completeness, correctness and quality at one buffer width (see the module)."""
    truth_length = float(shapely.length(truth).sum()) if len(truth) else 0.0
    pred_length = float(shapely.length(pred).sum()) if len(pred) else 0.0
    if not truth_length or not pred_length:
        return {"completeness": 0.0, "correctness": 0.0, "quality": 0.0}
    pred_zone = shapely.buffer(shapely.union_all(pred), buffer_m)
    truth_zone = shapely.buffer(shapely.union_all(truth), buffer_m)
    shapely.prepare(pred_zone)
    shapely.prepare(truth_zone)
    completeness = float(shapely.length(shapely.intersection(truth, pred_zone)).sum()) / truth_length
    correctness = float(shapely.length(shapely.intersection(pred, truth_zone)).sum()) / pred_length
    denominator = completeness - completeness * correctness + correctness
    quality = completeness * correctness / denominator if denominator > 0 else 0.0
    return {"completeness": completeness, "correctness": correctness, "quality": quality}


def junction_scores(truth: np.ndarray, pred: np.ndarray, radius_m: float) -> dict:
    """Junction precision and recall, one-to-one nearest-first matching within ``radius_m``."""
    true_j, pred_j = junctions(truth), junctions(pred)
    matched = 0
    if len(true_j) and len(pred_j):
        pairs = cKDTree(pred_j).sparse_distance_matrix(cKDTree(true_j), radius_m, output_type="coo_matrix")
        order = np.argsort(pairs.data, kind="stable")
        used_pred, used_true = set(), set()
        for k in order:
            p, t = int(pairs.row[k]), int(pairs.col[k])
            if p not in used_pred and t not in used_true:
                used_pred.add(p)
                used_true.add(t)
        matched = len(used_pred)
    return {
        "junction_precision": matched / len(pred_j) if len(pred_j) else float("nan"),
        "junction_recall": matched / len(true_j) if len(true_j) else float("nan"),
        "num_junctions_pred": len(pred_j),
        "num_junctions_truth": len(true_j),
    }


def score_lines(
    pred: np.ndarray,
    truth: np.ndarray,
    buffers_m=(1.0, 2.0),
    control_spacing_m: float = 5.0,
    snap_m: float = 2.0,
    junction_radius_m: float = 3.0,
    max_sources: int = 200,
    node_snap_m: float = 0.05,
) -> dict:
    """Every network score of two line layers already in one metric frame (metres)."""
    pred_parts, truth_parts = node_lines(pred, node_snap_m), node_lines(truth, node_snap_m)
    scores: dict = {
        "length_m_pred": float(shapely.length(pred_parts).sum()) if len(pred_parts) else 0.0,
        "length_m_truth": float(shapely.length(truth_parts).sum()) if len(truth_parts) else 0.0,
        "buffers": {},
    }
    for buffer_m in buffers_m:
        scores["buffers"][f"{buffer_m:g}"] = buffer_scores(truth_parts, pred_parts, buffer_m)
    scores |= apls(truth_parts, pred_parts, control_spacing_m, snap_m, max_sources)
    scores |= junction_scores(truth_parts, pred_parts, junction_radius_m)
    scores["components_pred"] = count_components(pred_parts)
    scores["components_truth"] = count_components(truth_parts)
    return scores


def score_files(pred_path, truth_path, **options) -> dict:
    """``score_lines`` of two files in any CRSs (see ``read_lines``)."""
    pred, pred_crs = read_lines(pred_path)
    truth, truth_crs = read_lines(truth_path)
    if not len(truth):
        raise LayerError(f"{truth_path}: no lines")
    metric_crs, unit_m = common_metric_frame(pred_crs, truth_crs, truth)
    pred = to_metric(pred, pred_crs, metric_crs, unit_m)
    truth = to_metric(truth, truth_crs, metric_crs, unit_m)
    scores = score_lines(pred, truth, **options)
    scores["frame"] = metric_crs.to_string()
    return scores


def cldice(pred_mask: np.ndarray, true_mask: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """clDice of two boolean masks (see the module)."""
    from skimage.morphology import skeletonize

    pred_mask, true_mask = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    if valid is not None:
        pred_mask, true_mask = pred_mask & valid, true_mask & valid
    pred_skeleton, true_skeleton = skeletonize(pred_mask), skeletonize(true_mask)
    tprec = (pred_skeleton & true_mask).sum() / max(pred_skeleton.sum(), 1)
    tsens = (true_skeleton & pred_mask).sum() / max(true_skeleton.sum(), 1)
    value = 2 * tprec * tsens / (tprec + tsens) if tprec + tsens > 0 else 0.0
    return {"cldice": float(value), "topology_precision": float(tprec), "topology_sensitivity": float(tsens)}


def cldice_rasters(pred_path, truth_path) -> dict:
    """clDice of two mask GeoTIFFs on the same grid (1 sidewalk, 255 nodata)."""
    import rasterio

    with rasterio.open(pred_path) as p, rasterio.open(truth_path) as t:
        if (p.width, p.height) != (t.width, t.height):
            raise LayerError(
                f"{pred_path} ({p.width}x{p.height}) and {truth_path} ({t.width}x{t.height}) differ"
            )
        pred, truth = p.read(1), t.read(1)
    valid = (pred != 255) & (truth != 255)
    return cldice(pred == 1, truth == 1, valid)


def format_table(scores: dict) -> str:
    """A plain-text table of the scores, for the terminal."""
    lines = [f"{'buffer':>8} {'complete':>9} {'correct':>9} {'quality':>9}"]
    for buffer_m, values in scores["buffers"].items():
        lines.append(
            f"{buffer_m + ' m':>8} {values['completeness']:9.4f} {values['correctness']:9.4f} {values['quality']:9.4f}"
        )
    lines.append(
        f"APLS {scores['apls']:.4f} (truth->pred {scores['apls_truth_to_pred']:.4f}, "
        f"pred->truth {scores['apls_pred_to_truth']:.4f})"
    )
    lines.append(
        f"junctions: precision {scores['junction_precision']:.4f}, recall {scores['junction_recall']:.4f} "
        f"({scores['num_junctions_pred']} predicted, {scores['num_junctions_truth']} true)"
    )
    lines.append(f"components: {scores['components_pred']} predicted, {scores['components_truth']} true")
    lines.append(f"length: {scores['length_m_pred']:.1f} m predicted, {scores['length_m_truth']:.1f} m true")
    if "cldice" in scores:
        lines.append(f"clDice {scores['cldice']:.4f}")
    return "\n".join(lines)
