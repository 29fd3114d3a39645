"""Sidewalk vectors -> chip masks: reading, reprojection, buffering of lines, rasterisation, annotated region.

Labels are lines (OpenStreetMap / OpenSidewalks ``footway=sidewalk`` centerlines) or polygons (a city's
sidewalk polygons) in GeoJSON, GeoPackage, Shapefile or anything else GDAL reads (through pyogrio), in any
CRS. For each raster they are brought into a metric frame of the raster (its own CRS scaled to metres, or
the local UTM zone for a geographic raster: ``sidewalk_hf.geo.units.metric_frame``), lines are buffered by
half their width there (the ``width`` attribute in metres, else ``line_width_m``; square caps and mitre
joins, so that lines meeting at a corner fill it), and the polygons are taken to the raster's CRS.

Rasterisation is ``rasterio.features.rasterize`` with ``all_touched=False``: a pixel is sidewalk (1) when
its centre lies inside a sidewalk polygon. Pixels outside the annotated region are 255 (ignore), because
unannotated is not background: the region is ``label_region`` polygons when given, else the convex hull of
each label file's (buffered) geometries.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely

SIDEWALK, BACKGROUND, IGNORE = 1, 0, 255
ALL_TOUCHED = False  # a pixel is sidewalk when its centre is inside a polygon (GDAL's default rule)
OSM_KEYS = frozenset({"highway", "footway", "osm_id", "@id", "osm_type", "sidewalk", "surface"})
_WIDTH = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(m|metres?|meters?|ft|feet|foot|')?\s*$", re.IGNORECASE)
_FOOT_M = 0.3048


class LabelInputError(ValueError):
    """A vector file or label option that cannot be used; the message names the file or the option."""


def parse_width_m(value) -> float:
    """An OSM-style ``width`` (``1.8``, ``"1.8"``, ``"1.8 m"``, ``"6 ft"``, ``"6'"``) in metres; NaN if unusable."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float, np.number)):
        return float(value) if np.isfinite(value) and value > 0 else math.nan
    match = _WIDTH.match(str(value))
    if not match:
        return math.nan
    number = float(match.group(1))
    unit = (match.group(2) or "m").lower()
    metres = number * (_FOOT_M if unit in ("ft", "feet", "foot", "'") else 1.0)
    return metres if metres > 0 else math.nan


@dataclass
class LabelLayer:
    """One vector file's sidewalks in its own CRS: polygons as given, lines with their widths in metres."""

    path: str
    crs_wkt: str
    polygons: np.ndarray  # shapely Polygons
    lines: np.ndarray  # shapely LineStrings
    line_widths_m: np.ndarray  # float64, one per line
    looks_like_osm: bool = False
    points_ignored: int = 0
    _tree: object = field(default=None, repr=False, compare=False)

    @property
    def geometries(self) -> np.ndarray:
        return np.concatenate([self.polygons, self.lines])

    @property
    def max_width_m(self) -> float:
        return float(self.line_widths_m.max()) if len(self.line_widths_m) else 0.0

    @property
    def tree(self):
        if self._tree is None:
            self._tree = shapely.STRtree(self.geometries)
        return self._tree

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tree"] = None  # rebuilt where needed, not shipped to worker processes
        return state


def _read_vectors(path: str | Path, where: str | None, columns: list[str]) -> tuple[dict, np.ndarray, list]:
    import pyogrio
    import pyogrio.raw
    from pyogrio.errors import DataSourceError, FieldError

    path = Path(path)
    if not path.exists():
        raise LabelInputError(f"{path}: no such vector file")
    try:
        info = pyogrio.read_info(path)
        wanted = [c for c in columns if c in set(info["fields"])]
        meta, _, wkb, fields = pyogrio.raw.read(path, columns=wanted, where=where or None, force_2d=True)
    except (DataSourceError, FieldError, ValueError) as error:
        raise LabelInputError(
            f"{path}: cannot be read as vectors (GeoJSON, GeoPackage, Shapefile, ...): {error}"
        ) from None
    meta["all_fields"] = list(info["fields"])
    meta["read_fields"] = wanted
    return meta, shapely.from_wkb(wkb), fields


def _explode(geometries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-part geometries and the index of the feature each came from."""
    index = np.arange(len(geometries))
    while True:
        types = shapely.get_type_id(geometries)
        if not np.isin(types, (4, 5, 6, 7)).any():  # Multi* and collections
            return geometries, index
        parts, part_index = shapely.get_parts(geometries, return_index=True)
        geometries, index = parts, index[part_index]


def read_label_layer(
    path: str | Path,
    *,
    width_field: str = "width",
    line_width_m: float | None = None,
    where: str | None = None,
) -> LabelLayer:
    """Read one vector file; lines without a usable width take ``line_width_m`` (an error when it is None)."""
    meta, geometries, fields = _read_vectors(path, where, [width_field])
    if not meta.get("crs"):
        raise LabelInputError(
            f"{path}: the vectors have no CRS (a Shapefile without its .prj?); give them one"
        )
    valid = ~shapely.is_missing(geometries) & ~shapely.is_empty(geometries)
    widths = np.full(len(geometries), math.nan)
    if meta["read_fields"]:
        widths = np.array([parse_width_m(v) for v in fields[0]], dtype=np.float64)
    parts, feature = _explode(geometries[valid])
    widths = widths[valid][feature]
    types = shapely.get_type_id(parts)
    is_line = np.isin(types, (1, 2))
    is_polygon = types == 3
    lines = parts[is_line]
    if types[is_line].size and (types[is_line] == 2).any():
        lines = np.array([shapely.LineString(g.coords) for g in lines], dtype=object)
    line_widths = widths[is_line]
    missing = np.isnan(line_widths)
    if missing.any():
        if line_width_m is None:
            raise LabelInputError(
                f"{path}: {int(missing.sum())} of {len(line_widths)} lines have no usable {width_field!r} "
                f"(metres, e.g. 1.8 or '6 ft'); give --line-width-m for them"
            )
        if not line_width_m > 0:
            raise LabelInputError(f"--line-width-m must be > 0, got {line_width_m}")
        line_widths[missing] = line_width_m
    if not lines.size and not is_polygon.any():
        raise LabelInputError(f"{path}: no line or polygon features{f' matching {where!r}' if where else ''}")
    return LabelLayer(
        path=str(path),
        crs_wkt=_crs_wkt(meta["crs"]),
        polygons=parts[is_polygon],
        lines=lines,
        line_widths_m=line_widths,
        looks_like_osm=bool(OSM_KEYS & {f.lower() for f in meta["all_fields"]}),
        points_ignored=int((~is_line & ~is_polygon).sum()),
    )


def read_region_layer(path: str | Path) -> LabelLayer:
    """The annotated region: polygons only, in any CRS."""
    meta, geometries, _ = _read_vectors(path, None, [])
    if not meta.get("crs"):
        raise LabelInputError(f"{path}: the region has no CRS; give it one")
    parts, _ = _explode(geometries[~shapely.is_missing(geometries) & ~shapely.is_empty(geometries)])
    polygons = parts[shapely.get_type_id(parts) == 3]
    if not polygons.size:
        raise LabelInputError(f"{path}: the label region must hold polygons, found none")
    return LabelLayer(str(path), _crs_wkt(meta["crs"]), polygons, np.empty(0, object), np.empty(0))


def _crs_wkt(crs) -> str:
    from pyproj import CRS

    return CRS.from_user_input(crs).to_wkt()


def hull_region(layer: LabelLayer) -> LabelLayer:
    """The default annotated region of a label file: the convex hull of its geometries, grown by its widest
    line (in the layer's CRS; the growth only needs to cover the buffers, so a generous degree is fine)."""
    from pyproj import CRS

    hull = shapely.convex_hull(shapely.GeometryCollection(list(layer.geometries)))
    crs = CRS.from_wkt(layer.crs_wkt)
    grow = layer.max_width_m
    if crs.is_projected:
        grow /= crs.axis_info[0].unit_conversion_factor
    else:
        grow /= 1e4  # metres -> degrees, at least 10x too much at any latitude below 84 degrees
    region = hull.buffer(grow, join_style="mitre") if grow > 0 else hull
    return LabelLayer(layer.path, layer.crs_wkt, np.array([region], object), np.empty(0, object), np.empty(0))


def _transform_geometries(geometries: np.ndarray, function) -> np.ndarray:
    if not len(geometries):
        return geometries
    return shapely.transform(geometries, lambda xy: np.column_stack(function(xy[:, 0], xy[:, 1])))


class RasterLabels:
    """The labels of one area of a raster as polygons in the raster's CRS, and the annotated region there."""

    def __init__(self, polygons: np.ndarray, region: np.ndarray | None):
        self.polygons = polygons
        self.region = region  # None: everything is annotated
        self.tree = shapely.STRtree(polygons)
        self.region_tree = shapely.STRtree(region) if region is not None else None
        if region is not None:
            shapely.prepare(region)

    @classmethod
    def for_area(cls, layers, region_layers, crs, transform, width: int, height: int, bounds) -> RasterLabels:
        """Labels for ``bounds`` (left, bottom, right, top in the raster's CRS) of a raster."""
        from pyproj import CRS, Transformer
        from rasterio.warp import transform_bounds

        from ..geo.units import metric_frame

        frame = metric_frame(crs, transform, width, height)
        raster_crs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
        widest = max([layer.max_width_m for layer in layers] + [0.0])
        margin = widest / frame.unit_m if raster_crs.is_projected else widest / 1e4
        left, bottom, right, top = bounds
        area = (left - margin, bottom - margin, right + margin, top + margin)
        area_box = shapely.box(*area)

        def bring(layer: LabelLayer, buffer_lines: bool) -> np.ndarray:
            layer_crs = CRS.from_wkt(layer.crs_wkt)
            query = shapely.box(*transform_bounds(raster_crs, layer_crs, *area, densify_pts=21))
            hits = layer.tree.query(query)
            if not hits.size:
                return np.empty(0, object)
            to_metric = Transformer.from_crs(layer_crs, frame.metric_crs, always_xy=True)

            def metric(x, y):
                mx, my = to_metric.transform(x, y)
                return np.asarray(mx) * frame.unit_m, np.asarray(my) * frame.unit_m

            geometries = _transform_geometries(layer.geometries[hits], metric)
            if buffer_lines:
                num_polygons = len(layer.polygons)
                is_line = hits >= num_polygons
                widths = layer.line_widths_m[hits[is_line] - num_polygons]
                geometries = geometries.copy()
                geometries[is_line] = shapely.buffer(
                    geometries[is_line], widths / 2, cap_style="square", join_style="mitre"
                )
            return _transform_geometries(geometries, frame.to_source)

        def densified(layer: LabelLayer) -> LabelLayer:
            # Region edges are long: add vertices so that reprojection bends them where it must.
            geometries = layer.geometries
            extent = shapely.total_bounds(geometries)
            step = max(extent[2] - extent[0], extent[3] - extent[1]) / 256 or 1.0
            return LabelLayer(
                layer.path,
                layer.crs_wkt,
                shapely.segmentize(geometries, step),
                layer.lines,
                layer.line_widths_m,
            )

        polygons = np.concatenate([bring(layer, True) for layer in layers] or [np.empty(0, object)])
        polygons = polygons[shapely.intersects(polygons, area_box)] if polygons.size else polygons
        region = None
        if region_layers is not None:
            region = np.concatenate([bring(densified(layer), False) for layer in region_layers])
            region = region[shapely.intersects(region, area_box)] if region.size else region
        return cls(polygons, region)

    @property
    def has_labelled_area(self) -> bool:
        return self.region is None or bool(self.region.size)

    def chip_mask(self, chip_transform, shape: tuple[int, int]) -> np.ndarray:
        """uint8 (H, W): 1 sidewalk, 0 background, 255 outside the annotated region."""
        from rasterio.features import rasterize
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(shape[0], shape[1], chip_transform)
        chip_box = shapely.box(min(west, east), min(south, north), max(west, east), max(south, north))
        mask = np.zeros(shape, np.uint8)
        hits = self.tree.query(chip_box, predicate="intersects")
        if hits.size:
            mask = rasterize(
                ((geometry, SIDEWALK) for geometry in self.polygons[hits]),
                out_shape=shape,
                transform=chip_transform,
                fill=BACKGROUND,
                all_touched=ALL_TOUCHED,
                dtype="uint8",
            )
        if self.region_tree is not None:
            inside = np.zeros(shape, np.uint8)
            hits = self.region_tree.query(chip_box, predicate="intersects")
            if hits.size and shapely.contains(self.region[hits], chip_box).any():
                return (
                    mask  # the chip lies inside the annotated region (the common case): nothing to rasterise
                )
            if hits.size:
                inside = rasterize(
                    ((geometry, 1) for geometry in self.region[hits]),
                    out_shape=shape,
                    transform=chip_transform,
                    fill=0,
                    all_touched=ALL_TOUCHED,
                    dtype="uint8",
                )
            mask[inside == 0] = IGNORE
        return mask
