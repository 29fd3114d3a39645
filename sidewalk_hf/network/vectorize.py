"""The vector stage: sidewalk masks (or probabilities) to sidewalk polygons and a centerline network.

Entry points (the end of ``scripts/predict.py`` calls the first per written mask):

``vectorize_raster(path, out_dir, cfg=None, threshold=None, tile_name=None) -> dict``
    One raster: a mask GeoTIFF (1 sidewalk, 0 background, 255 nodata) when ``threshold`` is None, else a
    probability GeoTIFF (uint8 0-254 = 0-1 with 255 nodata, or float 0-1) cut at ``threshold``. ``cfg`` is
    the project config (its ``VECTOR`` section is used), the ``VECTOR`` section itself, or None for the
    defaults. Writes ``<stem>.centerlines.geojson`` and ``<stem>.polygons.geojson`` in ``out_dir`` (``stem``
    is the file name without ``.tif`` and a trailing ``.mask``/``.prob``) and returns a summary: ``tile``,
    ``raster``, ``centerlines``, ``polygons``, ``geopackage`` (or None), ``crs``, ``pixel_size_m``,
    ``num_edges``, ``num_joined``, ``num_components``, ``length_m``, ``num_polygons``, ``num_blocks``,
    ``seconds``.

``vectorize_run(paths, out_dir, cfg=None, threshold=None, *, crs_source=False, workers=None, engine=None,
ray_address=None) -> dict``
    Several rasters (tiles) of one run: each is vectorised as above, reading its halo from its neighbours
    (rasters on one grid and CRS are read through a VRT mosaic), and with more than one raster the tiles'
    networks are merged across tile borders into ``run.centerlines.geojson`` / ``run.polygons.geojson``.
    Tiles run in this process, in ``workers`` processes (the local engine), or as Ray tasks (``engine
    "ray"``, ``ray_engine.py``); each engine runs ``run_tile``. With several rasters a tile that fails is
    recorded (``status`` ``failed`` and its ``error``) and the other tiles and the merge go on; a single
    raster's error is raised. Writes ``vectors.json`` (the summaries) and returns ``{"tiles": [...], "run":
    {...} or None, "failed": [tile names], "engine": ...}``.

Pipeline per tile: blocks (core + halo) -> clean (areas in m2 -> px) -> skeleton -> skeleton graph ->
clip to the core -> merge by exact coordinates -> metric frame (the CRS unit, or local UTM) -> prune spurs
-> join gaps -> drop small components -> simplify -> GeoJSON in WGS84 (+ GeoPackage in the source CRS
with ``crs_source``).
Ends where a line leaves the tile (at a tile border, or within ``EDGE_MARGIN_M`` of the run's outer edge)
are never pruned or joined from: the line continues beyond them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from ..geo.units import metric_frame
from .blocks import block_grid, clip_to_core, is_cut_point, merge_pieces
from .cleaning import area_m2_to_px, clean_mask
from .export import valid_geometries, write_geojson, write_geopackage
from .graph_ops import drop_small_components, join_gaps, prune_spurs, simplify, to_shapely
from .line_graph import LineGraph, dissolve_degree_two
from .skeleton_graph import skeleton_graph, skeleton_of

EDGE_MARGIN_M = 2.5  # an end this close to the run's outer edge is where a sidewalk leaves the imagery
# A branch lying wholly this close to the outer edge is a sidewalk whose centerline is outside the imagery
# (less than half of its width is visible, so its skeleton runs within a quarter width of the edge).
EDGE_SLIVER_M = 0.5
BLOCK_PX_RANGE = (256, 4096)
# Tiles up to this many pixels are polygonised at once from their cleaned blocks (one byte a pixel, and
# far faster than uniting per-block polygons); larger ones block by block, united across block borders.
WHOLE_TILE_POLYGONS_PX = 100_000_000
# Worker processes over tiles are spawned: a forked child of a process holding GDAL's and OpenMP's threads
# can deadlock (it did, in our tests), at the price of importing the package once per worker.
_START_METHOD = "spawn"
MASK_VALUES = (0, 1, 255)


class VectorInputError(ValueError):
    """A raster the vector stage cannot use; the message names the file."""


DEFAULTS = {
    "MIN_OBJECT_AREA_M2": 4.0,
    "MIN_HOLE_AREA_M2": 4.0,
    "SPUR_LENGTH_M": 3.0,
    "GAP_LENGTH_M": 6.0,
    "JOIN_MAX_ANGLE_DEG": 45.0,
    "JOIN_DETOUR_FACTOR": 4.0,
    "MIN_COMPONENT_LENGTH_M": 10.0,
    "SIMPLIFY_TOLERANCE_M": 0.25,
    "BLOCK_SIZE_M": 512.0,
    "HALO_M": 32.0,
    "THRESHOLD": 0.5,
    "WORKERS": 1,
    "ENGINE": "local",
    "RAY_ADDRESS": "",
}
ENGINES = ("local", "ray")


def vector_options(cfg=None) -> dict:
    """The ``VECTOR`` options as a plain dict, from the project config, its ``VECTOR`` node, or a dict."""
    if cfg is None:
        return dict(DEFAULTS)
    section = cfg.get("VECTOR", cfg) if hasattr(cfg, "get") else cfg
    options = dict(DEFAULTS)
    for key in DEFAULTS:
        if key in section:
            options[key] = section[key]
    return options


@dataclass(frozen=True)
class PixelParams:
    """The metre options of one mosaic turned into pixels at its centre."""

    pixel_size_m: float
    block_px: int
    halo_px: int
    min_object_px: int
    min_hole_px: int

    @classmethod
    def of(cls, options: dict, pixel_size_m: float) -> PixelParams:
        block_px = int(np.clip(round(options["BLOCK_SIZE_M"] / pixel_size_m), *BLOCK_PX_RANGE))
        return cls(
            pixel_size_m,
            block_px,
            math.ceil(options["HALO_M"] / pixel_size_m),
            area_m2_to_px(options["MIN_OBJECT_AREA_M2"], pixel_size_m),
            area_m2_to_px(options["MIN_HOLE_AREA_M2"], pixel_size_m),
        )


def output_stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".tiff", ".tif", ".vrt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    for suffix in (".mask", ".prob"):
        name = name.removesuffix(suffix)
    return name


def read_sidewalk(dataset, window, threshold: float | None, name: str) -> np.ndarray:
    """Sidewalk pixels of a window: mask value 1, or probability >= threshold (nodata never)."""
    data = dataset.read(1, window=window)
    if threshold is None:
        if data.dtype.kind == "f" or data.max(initial=0) > 1:
            bad = np.setdiff1d(np.unique(data), MASK_VALUES)
            if bad.size:
                raise VectorInputError(
                    f"{name}: values {bad[:5].tolist()} in a mask raster (expected 0, 1, 255 for nodata); "
                    "a probability raster needs --threshold"
                )
        return data == 1
    if data.dtype == np.uint8:
        return (data != 255) & (data.astype(np.float32) / 254.0 >= threshold)
    valid = np.isfinite(data)
    if dataset.nodata is not None:
        valid &= data != dataset.nodata
    return valid & (data >= threshold)


def _polygons_of(mask: np.ndarray, row0: int, col0: int) -> list:
    """Polygons (with holes) of a boolean array whose top-left pixel is (row0, col0), in pixel-corner
    coordinates of the raster (GDAL's polygonize through rasterio; rings to shapely as ragged arrays)."""
    from rasterio.features import shapes
    from rasterio.transform import Affine

    if not mask.any():
        return []
    transform = Affine(1.0, 0.0, float(col0), 0.0, 1.0, float(row0))
    coords, ring_offsets, polygon_offsets = [], [0], [0]
    for geom, _ in shapes(mask.astype(np.uint8), mask=mask, transform=transform):
        for ring in geom["coordinates"]:
            ring = np.asarray(ring, dtype=np.float64)
            coords.append(ring)
            ring_offsets.append(ring_offsets[-1] + len(ring))
        polygon_offsets.append(polygon_offsets[-1] + len(geom["coordinates"]))
    offsets = (np.array(ring_offsets), np.array(polygon_offsets))
    return list(shapely.from_ragged_array(shapely.GeometryType.POLYGON, np.concatenate(coords), offsets))


def _polygons_in_core(clean: np.ndarray, block, origin_row: int, origin_col: int) -> list:
    r0, r1, c0, c1 = block.core
    return _polygons_of(clean[r0 - origin_row : r1 - origin_row, c0 - origin_col : c1 - origin_col], r0, c0)


def _merge_polygons(pieces: list, cores: list, area: tuple[int, int, int, int]) -> np.ndarray:
    """Union of the pieces that meet across block borders inside ``area`` (pixel corner coordinates)."""
    if not pieces:
        return np.array([], dtype=object)
    geoms = np.array([g for g, _ in pieces], dtype=object)
    bounds = shapely.bounds(geoms)
    core = np.array([cores[i] for _, i in pieces], dtype=np.float64)  # r0, r1, c0, c1
    r_lo, r_hi, c_lo, c_hi = area
    touches = (
        ((bounds[:, 0] == core[:, 2]) & (core[:, 2] > c_lo))
        | ((bounds[:, 2] == core[:, 3]) & (core[:, 3] < c_hi))
        | ((bounds[:, 1] == core[:, 0]) & (core[:, 0] > r_lo))
        | ((bounds[:, 3] == core[:, 1]) & (core[:, 1] < r_hi))
    )
    border = np.flatnonzero(touches)
    if border.size < 2:
        return geoms
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    tree = shapely.STRtree(geoms[border])
    a, b = tree.query(geoms[border], predicate="intersects")
    n = border.size
    _, labels = connected_components(
        sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False
    )
    merged = [shapely.union_all(geoms[border[labels == k]]) for k in np.unique(labels)]
    rest = np.setdiff1d(np.arange(len(geoms)), border)
    out = list(geoms[rest]) + [g for m in merged for g in shapely.get_parts(m)]
    return np.array(out, dtype=object)


def tile_pieces(
    mosaic_path: str, area: tuple[int, int, int, int], params: PixelParams, threshold: float | None, name: str
) -> tuple[LineGraph, np.ndarray, int]:
    """The merged raw skeleton graph (mosaic pixel coordinates) and the polygons (pixel corners) of one
    tile, the ``area`` (row0, row1, col0, col1) of the mosaic, processed in blocks; and the block count."""
    import rasterio
    from rasterio.windows import Window

    r_lo, r_hi, c_lo, c_hi = area
    whole_tile = (r_hi - r_lo) * (c_hi - c_lo) <= WHOLE_TILE_POLYGONS_PX
    tile_mask = np.zeros((r_hi - r_lo, c_hi - c_lo), bool) if whole_tile else None
    with rasterio.open(mosaic_path) as dataset:
        shape = (dataset.height, dataset.width)
        blocks = block_grid(*shape, params.block_px, params.halo_px, area=area)
        pieces, polygon_pieces, cores = [], [], []
        for index, block in enumerate(blocks):
            r0, r1, c0, c1 = block.window
            sidewalk = read_sidewalk(dataset, Window(c0, r0, c1 - c0, r1 - r0), threshold, name)
            clean = clean_mask(sidewalk, params.min_object_px, params.min_hole_px, block.open_edges(shape))
            graph = skeleton_graph(skeleton_of(clean), origin=(r0, c0))
            pieces.append(clip_to_core(graph, block.core))
            if whole_tile:
                k0, k1, j0, j1 = block.core
                tile_mask[k0 - r_lo : k1 - r_lo, j0 - c_lo : j1 - c_lo] = clean[
                    k0 - r0 : k1 - r0, j0 - c0 : j1 - c0
                ]
            else:
                polygon_pieces += [(g, index) for g in _polygons_in_core(clean, block, r0, c0)]
                cores.append(block.core)
    if whole_tile:
        polygons = np.array(_polygons_of(tile_mask, r_lo, c_lo), dtype=object)
    else:
        polygons = _merge_polygons(polygon_pieces, cores, area)
    return merge_pieces(pieces), polygons, len(blocks)


@dataclass
class Mosaic:
    """Rasters sharing a CRS and a pixel grid, read as one (a VRT when there are several)."""

    path: str
    crs_wkt: str
    transform: tuple[float, ...]
    height: int
    width: int
    areas: list[tuple[int, int, int, int]]  # each raster's (row0, row1, col0, col1) in the mosaic


def _group_into_mosaics(paths: list[Path], out_dir: Path) -> list[tuple[Mosaic, list[int]]]:
    import rasterio

    infos = []
    for path in paths:
        try:
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise VectorInputError(f"{path}: no CRS; the vector stage needs a georeferenced raster")
                infos.append((path, src.crs.to_wkt(), src.transform, src.height, src.width))
        except rasterio.errors.RasterioIOError as error:
            raise VectorInputError(f"{path}: cannot be read as a raster ({error})") from None
    groups: dict[tuple, list[int]] = {}
    for i, (_, crs_wkt, transform, _, _) in enumerate(infos):
        a, b, c, d, e, f = tuple(transform)[:6]
        key = (crs_wkt, a, b, d, e, round((c / a) % 1, 6), round((f / e) % 1, 6))
        groups.setdefault(key, []).append(i)
    mosaics = []
    for k, members in enumerate(groups.values()):
        if len(members) == 1:
            path, crs_wkt, transform, height, width = infos[members[0]]
            mosaics.append(
                (
                    Mosaic(str(path), crs_wkt, tuple(transform)[:6], height, width, [(0, height, 0, width)]),
                    members,
                )
            )
            continue
        from ..data.scene import write_mosaic_vrt

        vrt = write_mosaic_vrt([infos[i][0] for i in members], out_dir / f"_mosaic_{k}.vrt")
        with rasterio.open(vrt) as src:
            transform, height, width = src.transform, src.height, src.width
        areas = []
        for i in members:
            _, _, t, h, w = infos[i]
            row0, col0 = round((t.f - transform.f) / transform.e), round((t.c - transform.c) / transform.a)
            areas.append((row0, row0 + h, col0, col0 + w))
        mosaics.append(
            (Mosaic(str(vrt), infos[members[0]][1], tuple(transform)[:6], height, width, areas), members)
        )
    return mosaics


class _Frame:
    """Pixel coordinates of a mosaic <-> source CRS <-> metric frame <-> WGS84."""

    def __init__(self, mosaic: Mosaic):
        self.mosaic = mosaic
        self.metric = metric_frame(mosaic.crs_wkt, mosaic.transform, mosaic.width, mosaic.height)

    def pixel_to_source(self, x, y, centre: bool = True):
        a, b, c, d, e, f = self.mosaic.transform
        shift = 0.5 if centre else 0.0
        return a * (x + shift) + b * (y + shift) + c, d * (x + shift) + e * (y + shift) + f

    def pixel_to_metric(self, x, y, centre: bool = True):
        return self.metric.to_metric(*self.pixel_to_source(x, y, centre))


def _distance_to_outer_edge(xy: np.ndarray, mosaic: Mosaic) -> np.ndarray:
    """Pixels from pixel-centre coordinates to the mosaic's outer edge."""
    x, y = xy[:, 0], xy[:, 1]
    return np.minimum.reduce([x + 0.5, mosaic.width - 0.5 - x, y + 0.5, mosaic.height - 0.5 - y])


def _protected_ends(graph: LineGraph, mosaic: Mosaic, margin_px: float) -> np.ndarray:
    """Pixel coordinates of the ends where a line continues: tile-border cuts and the run's outer edge."""
    if not graph.num_edges:
        return np.zeros((0, 2))
    node_xy, _, _, degree = graph.nodes()
    ends = node_xy[degree == 1]
    return ends[is_cut_point(ends) | (_distance_to_outer_edge(ends, mosaic) <= margin_px)]


def drop_edge_slivers(graph: LineGraph, mosaic: Mosaic, sliver_px: float) -> LineGraph:
    """Trim branches (from an end of degree 1) where they run within ``sliver_px`` of the outer edge."""
    if not graph.num_edges:
        return graph
    _, u, v, degree = graph.nodes()
    paths, changed = graph.paths(), False
    keep = np.ones(graph.num_edges, bool)
    for i in np.flatnonzero((degree[u] == 1) | (degree[v] == 1)):
        path = paths[i]
        near = _distance_to_outer_edge(path, mosaic) <= sliver_px
        if not near[0] and not near[-1]:
            continue
        if near.all():
            keep[i], changed = False, True
            continue
        start, stop = 0, len(path)
        if degree[u[i]] == 1 and near[0]:
            start = int(np.argmin(near))
        if degree[v[i]] == 1 and near[-1]:
            stop = len(path) - int(np.argmin(near[::-1]))
        if stop - start >= 2 and (start, stop) != (0, len(path)):
            paths[i], changed = path[start:stop], True
    if not changed:
        return graph
    trimmed = LineGraph.from_paths(
        [paths[i] for i in np.flatnonzero(keep)], graph.joined[keep], graph.tile[keep]
    )
    return dissolve_degree_two(trimmed)


def finish_network(raw: LineGraph, frame: _Frame, options: dict, pixel_size_m: float) -> LineGraph:
    """Raw merged graph (pixels) -> metric frame -> without edge slivers, pruned, joined, without small
    components, simplified (and pruned again: simplified lines are a little shorter)."""
    raw = drop_edge_slivers(raw, frame.mosaic, EDGE_SLIVER_M / pixel_size_m)
    protected = _protected_ends(raw, frame.mosaic, EDGE_MARGIN_M / pixel_size_m)
    graph = raw.map_coords(frame.pixel_to_metric)
    if len(protected):
        protected = np.column_stack(frame.pixel_to_metric(protected[:, 0], protected[:, 1]))
    graph = prune_spurs(graph, options["SPUR_LENGTH_M"], protected)
    graph = join_gaps(
        graph,
        options["GAP_LENGTH_M"],
        options["JOIN_MAX_ANGLE_DEG"],
        options["JOIN_DETOUR_FACTOR"],
        protected=protected,
    )
    graph = drop_small_components(graph, options["MIN_COMPONENT_LENGTH_M"], protected)
    graph = simplify(graph, options["SIMPLIFY_TOLERANCE_M"])
    # simplifying shortens lines a little: a spur just over the length before may be just under it now
    return simplify(prune_spurs(graph, options["SPUR_LENGTH_M"], protected), 0.0)


def _to_wgs84(geometries: np.ndarray, frame_of: np.ndarray, frames: list[_Frame]) -> np.ndarray:
    """Metric geometries -> lon/lat, each through its own frame (vectorised per frame)."""
    out = np.array(geometries, dtype=object, copy=True)
    for k, frame in enumerate(frames):
        sel = frame_of == k
        if sel.any():
            out[sel] = shapely.transform(
                out[sel], lambda xy, fr=frame: np.column_stack(fr.metric.to_wgs84(xy[:, 0], xy[:, 1]))
            )
    return out


def _write_outputs(
    stem: str,
    out_dir: Path,
    graph: LineGraph,
    polygons_metric: np.ndarray,
    polygon_tiles: np.ndarray,
    frames: list[_Frame],
    frame_of_tile: np.ndarray,
    tile_names: list[str],
    crs_source: bool,
) -> dict:
    """GeoJSON (and with ``crs_source`` a GeoPackage) of a metric network and its polygons; tile ``t``'s
    geometries are in ``frames[frame_of_tile[t]]``."""
    lines = to_shapely(graph)
    lengths = shapely.length(lines) if len(lines) else np.zeros(0)
    components = graph.components()
    properties = {
        "length_m": lengths,
        "component_id": components,
        "joined": graph.joined,
        "tile": np.array([tile_names[t] for t in graph.tile], dtype=object),
    }
    polygon_properties = {
        "area_m2": shapely.area(polygons_metric) if len(polygons_metric) else np.zeros(0),
        "tile": np.array([tile_names[t] for t in polygon_tiles], dtype=object),
    }
    wgs_lines = _to_wgs84(lines, frame_of_tile[graph.tile], frames)
    wgs_polygons = _to_wgs84(polygons_metric, frame_of_tile[polygon_tiles], frames)
    centerlines = write_geojson(
        out_dir / f"{stem}.centerlines.geojson", valid_geometries(wgs_lines), properties
    )
    polygons = write_geojson(
        out_dir / f"{stem}.polygons.geojson", valid_geometries(wgs_polygons), polygon_properties
    )
    geopackage = None
    if crs_source:
        if len(frames) != 1:
            raise VectorInputError(f"{stem}: --crs source needs every raster of a merged network in one CRS")
        frame = frames[0]

        def to_source(xy):
            return np.column_stack(frame.metric.to_source(xy[:, 0], xy[:, 1]))

        geopackage = out_dir / f"{stem}.gpkg"
        geopackage.unlink(missing_ok=True)
        wkt = frame.mosaic.crs_wkt
        source_lines = valid_geometries(shapely.transform(lines, to_source))
        source_polygons = valid_geometries(shapely.transform(polygons_metric, to_source))
        write_geopackage(geopackage, "centerlines", source_lines, properties, wkt, "LineString")
        write_geopackage(
            geopackage, "polygons", source_polygons, polygon_properties, wkt, "MultiPolygon", append=True
        )
    return {
        "centerlines": str(centerlines),
        "polygons": str(polygons),
        "geopackage": str(geopackage) if geopackage else None,
        "num_edges": int(graph.num_edges),
        "num_joined": int(graph.joined.sum()),
        "num_components": int(components.max() + 1) if len(components) else 0,
        "length_m": round(float(lengths.sum()), 3),
        "num_polygons": len(polygons_metric),
    }


def _polygons_to_metric(polygons: np.ndarray, frame: _Frame, tolerance_m: float) -> np.ndarray:
    if not len(polygons):
        return polygons
    metric = shapely.transform(
        polygons, lambda xy: np.column_stack(frame.pixel_to_metric(xy[:, 0], xy[:, 1], centre=False))
    )
    if tolerance_m > 0:
        simplified = shapely.simplify(metric, tolerance_m, preserve_topology=False)
        invalid = ~shapely.is_valid(simplified)  # rare: redo those keeping their topology
        simplified[invalid] = shapely.simplify(metric[invalid], tolerance_m, preserve_topology=True)
        metric = simplified
    return metric[~shapely.is_empty(metric)]


def _tile_job(job: dict) -> dict:
    """One tile: raw graph and polygons, finished network, files. Runs in a worker process too."""
    started = time.perf_counter()
    mosaic, index, options = job["mosaic"], job["index"], job["options"]
    frame = _Frame(mosaic)
    params = PixelParams.of(options, frame.metric.pixel_size_m)
    raw, polygons, num_blocks = tile_pieces(
        mosaic.path, mosaic.areas[index], params, job["threshold"], job["raster"]
    )
    raw.tile[:] = 0
    network = finish_network(raw, frame, options, params.pixel_size_m)
    polygons_metric = _polygons_to_metric(polygons, frame, options["SIMPLIFY_TOLERANCE_M"])
    summary = {
        "tile": job["tile"],
        "raster": job["raster"],
        "status": "ok",
        "crs": frame.metric.source_crs.to_string(),
    }
    summary |= _write_outputs(
        job["stem"],
        Path(job["out_dir"]),
        network,
        polygons_metric,
        np.zeros(len(polygons_metric), np.int32),
        [frame],
        np.zeros(1, np.int64),
        [job["tile"]],
        job["crs_source"],
    )
    summary |= {
        "pixel_size_m": round(params.pixel_size_m, 6),
        "num_blocks": num_blocks,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return {"summary": summary, "raw": raw, "polygons_metric": polygons_metric}


def run_tile(job: dict) -> dict:
    """One tile of a run of several, on any engine: its result, or its failure as its summary (``status``
    ``failed``, ``error``) so that one bad tile never ends a run of many."""
    try:
        return _tile_job(job)
    except Exception as error:  # noqa: BLE001 - recorded in vectors.json, named by the CLI
        failure = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        return {"summary": {"tile": job["tile"], "raster": job["raster"], **failure}, "raw": None}


def _run_tiles(jobs: list[dict], engine: str, workers: int, ray_address: str | None) -> list[dict]:
    """The jobs' results in their order: one raster in this process (its error is raised), several in this
    process, in ``workers`` spawned processes or as Ray tasks."""
    if len(jobs) == 1:
        return [_tile_job(jobs[0])]
    if engine == "ray":
        from .ray_engine import run_tiles_on_ray

        return run_tiles_on_ray(jobs, address=ray_address)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context(_START_METHOD)
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            return list(pool.map(run_tile, jobs))
    return [run_tile(job) for job in jobs]


def vectorize_run(
    paths,
    out_dir,
    cfg=None,
    threshold: float | None = None,
    *,
    tile_names=None,
    crs_source: bool = False,
    workers: int | None = None,
    engine: str | None = None,
    ray_address: str | None = None,
    write_summary: bool = True,
) -> dict:
    """Vectorise several rasters of one run and merge their networks (see the module)."""
    started = time.perf_counter()
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise VectorInputError("no raster given")
    for path in paths:
        if not path.exists():
            raise VectorInputError(f"{path}: no such file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = vector_options(cfg)
    engine = engine or options["ENGINE"]
    if engine not in ENGINES:
        raise VectorInputError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    on_ray = engine == "ray" and len(paths) > 1
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise VectorInputError(f"threshold {threshold} is not a probability in [0, 1]")
    names = list(tile_names) if tile_names else [None] * len(paths)
    names = [name or output_stem(path) for name, path in zip(names, paths)]
    stems = [output_stem(path) for path in paths]
    if len(set(stems)) != len(stems) or len(set(names)) != len(names):
        raise VectorInputError(f"two inputs would write the same outputs: {stems} (tiles {names})")
    # The VRTs live for the run only; Ray's nodes read them, and the rasters, from the shared output folder.
    mosaic_parent = out_dir if on_ray else None
    with tempfile.TemporaryDirectory(prefix=".sidewalk_mosaic_", dir=mosaic_parent) as mosaic_dir:
        read_paths = [path.resolve() for path in paths] if on_ray else paths
        mosaics = _group_into_mosaics(read_paths, Path(mosaic_dir))
        jobs = []
        for mosaic, members in mosaics:
            for index, i in enumerate(members):
                jobs.append(
                    {
                        "mosaic": mosaic,
                        "index": index,
                        "options": options,
                        "threshold": threshold,
                        "raster": str(paths[i]),
                        "tile": names[i],
                        "stem": stems[i],
                        "out_dir": str(out_dir.resolve() if on_ray else out_dir),
                        "crs_source": crs_source,
                        "order": i,
                    }
                )
        workers = int(workers if workers is not None else options["WORKERS"])
        results = _run_tiles(jobs, engine, workers, ray_address or options["RAY_ADDRESS"] or None)

        run_summary = None
        if len(paths) > 1 and any(r["raw"] is not None for r in results):
            run_summary = _merge_run(mosaics, jobs, results, names, options, out_dir, crs_source)
        tiles = [
            r["summary"] for _, r in sorted(zip([j["order"] for j in jobs], results), key=lambda x: x[0])
        ]
    report = {
        "tiles": tiles,
        "run": run_summary,
        "failed": [t["tile"] for t in tiles if t["status"] == "failed"],
        "engine": engine,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if write_summary:
        (out_dir / "vectors.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _merge_run(mosaics, jobs, results, names, options, out_dir: Path, crs_source: bool) -> dict:
    """One network for the run: each mosaic's tile graphs merged at the tile borders, then finished."""
    frames, networks, polygons, polygon_tiles, tile_frame = [], [], [], [], np.zeros(len(names), np.int64)
    for k, (mosaic, _) in enumerate(mosaics):
        frame = _Frame(mosaic)
        frames.append(frame)
        raws = []
        for job, result in zip(jobs, results):
            if result["raw"] is None:  # a failed tile: the run's network is that of the others
                continue
            if job["mosaic"] is mosaic or job["mosaic"].path == mosaic.path:
                raw = result["raw"]
                raw.tile[:] = job["order"]
                raws.append(raw)
                tile_frame[job["order"]] = k
                polygons.append(result["polygons_metric"])
                polygon_tiles.append(np.full(len(result["polygons_metric"]), job["order"], np.int32))
        merged = merge_pieces(raws)
        networks.append(finish_network(merged, frame, options, frame.metric.pixel_size_m))
    graph = LineGraph.concatenate(networks)
    summary = _write_outputs(
        "run",
        out_dir,
        graph,
        np.concatenate(polygons) if polygons else np.array([], dtype=object),
        np.concatenate(polygon_tiles) if polygon_tiles else np.zeros(0, np.int32),
        frames,
        tile_frame,
        names,
        crs_source and len(mosaics) == 1,
    )
    return {"tile": "run", **summary}


def vectorize_raster(
    path, out_dir, cfg=None, threshold: float | None = None, tile_name: str | None = None
) -> dict:
    """Vectorise one raster (see the module); returns its summary."""
    report = vectorize_run([path], out_dir, cfg, threshold, tile_names=[tile_name], write_summary=False)
    return report["tiles"][0]
