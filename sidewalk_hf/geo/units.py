"""Lengths in metres whatever a raster's CRS: the unit of a projected CRS, or a local UTM frame.

Thresholds that a user gives in metres (an area to drop, a spur to prune, a gap to join) must mean metres
on the ground. A projected CRS measures in its own linear unit: metres, US survey feet (1200/3937 m, the
New Jersey and most US State Plane systems) or international feet (0.3048 m); those are converted with
``metres_per_unit``. A geographic CRS (degrees) has no such unit, so work happens in the UTM zone of the
raster's centre (``metric_frame``), where distortion is at most 0.1 % within the zone; Web Mercator is never
used (its scale error is 1/cos(latitude), 1.3x at New Jersey's 40 degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

US_SURVEY_FOOT_M = 1200 / 3937
INTERNATIONAL_FOOT_M = 0.3048

_KNOWN_UNITS_M = {
    "metre": 1.0,
    "meter": 1.0,
    "m": 1.0,
    "us survey foot": US_SURVEY_FOOT_M,
    "foot_us": US_SURVEY_FOOT_M,
    "us-ft": US_SURVEY_FOOT_M,
    "foot": INTERNATIONAL_FOOT_M,
    "ft": INTERNATIONAL_FOOT_M,
    "international foot": INTERNATIONAL_FOOT_M,
}


class CRSUnitError(ValueError):
    """A CRS whose linear unit cannot be turned into metres; the message names the CRS."""


def _pyproj_crs(crs):
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if crs is None:
        raise CRSUnitError("the raster has no CRS: lengths in metres cannot be measured")
    if hasattr(crs, "to_wkt") and not isinstance(crs, CRS):
        crs = crs.to_wkt()  # rasterio CRS
    try:
        return CRS.from_user_input(crs)
    except CRSError as error:
        raise CRSUnitError(f"unknown CRS {crs!r}: {error}") from None


def metres_per_unit(crs) -> float:
    """Metres in one linear unit of a projected CRS (1.0, 1200/3937 or 0.3048, ...).

    Accepts anything pyproj or rasterio understand (``"EPSG:3424"``, a WKT, a ``rasterio.crs.CRS``).
    A geographic or unitless CRS is an error naming it: use ``metric_frame`` for those.
    """
    crs = _pyproj_crs(crs)
    if not crs.is_projected:
        raise CRSUnitError(
            f"CRS {crs.name!r} ({crs.to_string()}) is not projected: its unit is not a length; "
            "use sidewalk_hf.geo.units.metric_frame (local UTM zone)"
        )
    axis = crs.axis_info[0]
    factor = axis.unit_conversion_factor
    name = (axis.unit_name or "").lower()
    if name in _KNOWN_UNITS_M:
        return _KNOWN_UNITS_M[name]
    if factor and factor > 0 and axis.unit_code:
        return float(factor)
    raise CRSUnitError(f"CRS {crs.name!r} ({crs.to_string()}): unknown linear unit {axis.unit_name!r}")


def utm_crs_for(lon: float, lat: float):
    """The WGS84 UTM zone CRS (EPSG:326zz north, 327zz south) containing a lon/lat point."""
    from pyproj import CRS

    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise CRSUnitError(f"({lon}, {lat}) is not a longitude/latitude")
    zone = min(int((lon + 180) // 6) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


@dataclass
class MetricFrame:
    """Coordinates of a raster's CRS <-> a metric frame, and metric -> WGS84 lon/lat.

    ``metric_crs`` is the source CRS itself for projected CRSs (metric = source x ``unit_m``, an exact
    scale) and the local UTM zone for geographic ones. ``pixel_size_m`` is the side of a square of one
    pixel's ground area at the raster's centre, for turning areas and lengths in metres into pixels.
    """

    source_crs: object  # pyproj CRS
    metric_crs: object  # pyproj CRS
    unit_m: float  # projected: metres per source unit (metric = source x unit_m); geographic: 1.0
    pixel_size_m: float
    _to_metric: object = None
    _from_metric: object = None
    _metric_to_wgs84: object = None

    def to_metric(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self._to_metric is None:
            return x * self.unit_m, y * self.unit_m
        return self._to_metric.transform(x, y)

    def to_source(self, xm, ym) -> tuple[np.ndarray, np.ndarray]:
        xm, ym = np.asarray(xm, dtype=np.float64), np.asarray(ym, dtype=np.float64)
        if self._from_metric is None:
            return xm / self.unit_m, ym / self.unit_m
        return self._from_metric.transform(xm, ym)

    def to_wgs84(self, xm, ym) -> tuple[np.ndarray, np.ndarray]:
        """Metric coordinates -> (lon, lat)."""
        return self._metric_to_wgs84.transform(np.asarray(xm, np.float64), np.asarray(ym, np.float64))


def metric_frame(crs, transform=None, width: int = 0, height: int = 0) -> MetricFrame:
    """The metric working frame of a raster (``transform`` an affine, (a, b, c, d, e, f) or rasterio's).

    Projected CRS: the source coordinates scaled to metres. Geographic CRS: the UTM zone of the raster's
    centre (a raster spanning zones still gets one frame; within 3 degrees of its central meridian the
    scale error stays under 0.1 %).
    """
    from pyproj import CRS, Transformer

    source = _pyproj_crs(crs)
    wgs84 = CRS.from_epsg(4326)
    a, b, c, d, e, f = (tuple(transform)[:6]) if transform is not None else (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    centre_x = a * width / 2 + b * height / 2 + c
    centre_y = d * width / 2 + e * height / 2 + f
    if source.is_projected:
        unit = metres_per_unit(source)
        pixel_size_m = math.sqrt(abs(a * e - b * d)) * unit
        to_wgs84 = Transformer.from_crs(source, wgs84, always_xy=True)
        scaled = _ScaledToWgs84(to_wgs84, unit)
        return MetricFrame(source, source, unit, pixel_size_m, None, None, scaled)
    if not source.is_geographic:
        raise CRSUnitError(f"CRS {source.name!r} ({source.to_string()}) is neither projected nor geographic")
    lon, lat = Transformer.from_crs(source, wgs84, always_xy=True).transform(centre_x, centre_y)
    utm = utm_crs_for(lon, lat)
    to_metric = Transformer.from_crs(source, utm, always_xy=True)
    from_metric = Transformer.from_crs(utm, source, always_xy=True)
    corners = np.array([[centre_x, centre_y], [centre_x + a, centre_y + d], [centre_x + b, centre_y + e]])
    mx, my = to_metric.transform(corners[:, 0], corners[:, 1])
    ux, uy = mx[1] - mx[0], my[1] - my[0]
    vx, vy = mx[2] - mx[0], my[2] - my[0]
    pixel_size_m = math.sqrt(abs(ux * vy - uy * vx))
    return MetricFrame(
        source,
        utm,
        1.0,
        pixel_size_m,
        to_metric,
        from_metric,
        Transformer.from_crs(utm, wgs84, always_xy=True),
    )


class _ScaledToWgs84:
    """Metric (source x unit) -> WGS84 for projected CRSs."""

    def __init__(self, transformer, unit_m: float):
        self.transformer, self.unit_m = transformer, unit_m

    def transform(self, xm, ym):
        return self.transformer.transform(np.asarray(xm) / self.unit_m, np.asarray(ym) / self.unit_m)
