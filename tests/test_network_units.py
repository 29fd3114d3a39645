"""Metres whatever the CRS: projected units converted, geographic rasters in their local UTM zone."""

import math

import pytest

from sidewalk_hf.geo.units import (
    INTERNATIONAL_FOOT_M,
    US_SURVEY_FOOT_M,
    CRSUnitError,
    metres_per_unit,
    metric_frame,
    utm_crs_for,
)


def test_metres_per_unit_of_metre_and_feet_crs():
    assert metres_per_unit("EPSG:32618") == 1.0
    assert metres_per_unit("EPSG:3424") == pytest.approx(US_SURVEY_FOOT_M, rel=1e-12)  # NJ State Plane, US ft
    assert metres_per_unit("EPSG:2229") == pytest.approx(US_SURVEY_FOOT_M, rel=1e-12)  # California V, US ft
    assert metres_per_unit("EPSG:2277") == pytest.approx(US_SURVEY_FOOT_M, rel=1e-12)  # Texas Central, US ft
    assert metres_per_unit("EPSG:3857") == 1.0
    assert metres_per_unit("EPSG:2222") == pytest.approx(INTERNATIONAL_FOOT_M, rel=1e-12)  # Arizona East, ft


def test_geographic_crs_is_an_error_naming_it():
    with pytest.raises(CRSUnitError, match="EPSG:4326.*not projected"):
        metres_per_unit("EPSG:4326")
    with pytest.raises(CRSUnitError, match="no CRS"):
        metres_per_unit(None)


def test_geographic_raster_works_in_its_utm_zone_not_web_mercator():
    # a tile at New Jersey's latitude: 1e-5 degree pixels
    frame = metric_frame("EPSG:4326", (1e-5, 0.0, -74.5, 0.0, -1e-5, 40.2), 5000, 5000)
    assert frame.metric_crs.to_epsg() == 32618
    # ground size of a 1e-5 x 1e-5 degree pixel at 40.18 N: sqrt(0.849 m x 1.111 m)
    expected = math.sqrt(1e-5 * 111_320 * math.cos(math.radians(40.175)) * 1e-5 * 111_000)
    assert frame.pixel_size_m == pytest.approx(expected, rel=0.01)
    lon, lat = frame.to_wgs84(*frame.to_metric(-74.4, 40.1))
    assert (float(lon), float(lat)) == pytest.approx((-74.4, 40.1), abs=1e-9)


def test_feet_raster_metric_frame_scales_by_the_unit():
    frame = metric_frame("EPSG:3424", (2.0, 0.0, 600_000.0, 0.0, -2.0, 700_000.0), 100, 100)
    assert frame.pixel_size_m == pytest.approx(2 * US_SURVEY_FOOT_M)
    x, y = frame.to_metric(1000.0, 2000.0)
    assert (float(x), float(y)) == pytest.approx((1000 * US_SURVEY_FOOT_M, 2000 * US_SURVEY_FOOT_M))


def test_utm_zone_lookup():
    assert utm_crs_for(-74.5, 40.2).to_epsg() == 32618
    assert utm_crs_for(151.2, -33.9).to_epsg() == 32756
