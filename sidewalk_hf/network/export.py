"""Writing the network: GeoJSON (RFC 7946: WGS84 longitude/latitude, no ``crs`` member) and GeoPackage.

GeoJSON is what web maps and QGIS open directly; RFC 7946 fixes it to WGS84 lon/lat, polygons with
counter-clockwise exteriors and clockwise holes. ``--crs source`` adds a GeoPackage in the raster's own CRS
(written with pyogrio, GDAL's vectorised bindings), one layer per kind, for GIS work at full precision.
Geometries are made valid before writing; empty ones are dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import shapely


def _json_value(value):
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return round(float(value), 3)
    return value


def valid_geometries(geometries: np.ndarray) -> np.ndarray:
    """Invalid geometries repaired (``make_valid``), keeping polygons polygonal and lines linear."""
    geometries = np.asarray(geometries, dtype=object)
    invalid = ~shapely.is_valid(geometries)
    if invalid.any():
        repaired = shapely.make_valid(geometries[invalid], method="structure", keep_collapsed=False)
        geometries = geometries.copy()
        geometries[invalid] = repaired
    return geometries


def write_geojson(path: str | os.PathLike, geometries: np.ndarray, properties: dict[str, np.ndarray]) -> Path:
    """A FeatureCollection of ``geometries`` (already in lon/lat) with one property column per key."""
    path = Path(path)
    geometries = np.asarray(geometries, dtype=object)
    keep = ~shapely.is_empty(geometries) if len(geometries) else np.zeros(0, bool)
    polygonal = shapely.get_type_id(geometries) >= 3 if len(geometries) else np.zeros(0, bool)
    if polygonal.any():
        geometries = geometries.copy()
        geometries[polygonal] = shapely.orient_polygons(geometries[polygonal], exterior_cw=False)
    texts = shapely.to_geojson(geometries[keep]) if keep.any() else []
    columns = {key: np.asarray(values)[keep] for key, values in properties.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        out.write('{"type": "FeatureCollection", "features": [\n')
        for i, text in enumerate(texts):
            props = json.dumps({key: _json_value(values[i]) for key, values in columns.items()})
            sep = ",\n" if i else ""
            out.write(f'{sep}{{"type": "Feature", "properties": {props}, "geometry": {text}}}')
        out.write("\n]}\n")
    return path


def write_geopackage(
    path: str | os.PathLike,
    layer: str,
    geometries: np.ndarray,
    properties: dict[str, np.ndarray],
    crs_wkt: str,
    geometry_type: str,
    append: bool = False,
) -> Path:
    """One layer (``geometry_type`` "LineString" or "MultiPolygon") of a GeoPackage (pyogrio)."""
    from pyogrio.raw import write

    path = Path(path)
    geometries = np.asarray(geometries, dtype=object)
    keep = ~shapely.is_empty(geometries) if len(geometries) else np.zeros(0, bool)
    polygonal = geometry_type == "MultiPolygon"
    fields = list(properties)
    field_data = [np.asarray(properties[key])[keep] for key in fields]
    field_data = [column.astype(np.int64) if column.dtype == bool else column for column in field_data]
    write(
        str(path),
        shapely.to_wkb(geometries[keep]),
        field_data,
        fields,
        layer=layer,
        driver="GPKG",
        geometry_type=geometry_type,
        promote_to_multi=polygonal,
        crs=crs_wkt,
        append=append,
    )
    return path
