"""The vector stage's files and command lines: RFC 7946 GeoJSON, GeoPackage in the source CRS, CRS units,
probability rasters, bad inputs, a tile of 150,000 speckles."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import Affine

from sidewalk_hf.data.scene import write_scene
from sidewalk_hf.network.vectorize import VectorInputError, vectorize_raster

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"), "scene", height_px=600, width_px=700, seed=11)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, array, crs="EPSG:32618", transform=None, nodata=255):
    transform = transform or Affine(0.25, 0, 560_000, 0, -0.25, 4_460_000)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=array.shape[0],
        width=array.shape[1],
        count=1,
        dtype=array.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(array[None])
    return path


def test_centerlines_are_rfc7946_geojson_with_the_contract_properties(scene, tmp_path):
    summary = vectorize_raster(scene.truth_mask, tmp_path, None, tile_name="tile-7")
    document = json.loads(Path(summary["centerlines"]).read_text())
    assert "crs" not in document and summary["centerlines"].endswith("scene.truth.centerlines.geojson")
    features = document["features"]
    assert len(features) == summary["num_edges"] > 10
    assert set(features[0]["properties"]) == {"length_m", "component_id", "joined", "tile"}
    assert {f["properties"]["tile"] for f in features} == {"tile-7"}
    lines = np.array([shapely.geometry.shape(f["geometry"]) for f in features])
    lon, lat = shapely.get_coordinates(lines).T
    assert (-75 < lon).all() and (lon < -74).all() and (40 < lat).all() and (lat < 41).all()  # lon, lat order
    assert shapely.is_valid(lines).all() and (shapely.length(lines) > 0).all()
    assert len({shapely.normalize(g).wkb for g in lines}) == len(lines)  # no duplicate edges
    total = sum(f["properties"]["length_m"] for f in features)
    assert total == pytest.approx(summary["length_m"], abs=0.01 * len(features))


def test_polygons_keep_holes_drop_small_ones_and_are_counter_clockwise(tmp_path):
    mask = np.zeros((200, 200), np.uint8)
    mask[20:180, 20:180] = 1
    mask[50:150, 50:150] = 0  # a 25 x 25 m block: a hole kept
    mask[30:33, 30:33] = 0  # a 0.56 m2 hole: filled
    mask[190:193, 190:193] = 1  # a 0.56 m2 speckle: removed
    summary = vectorize_raster(_write(tmp_path / "ring.tif", mask), tmp_path, None)
    features = json.loads(Path(summary["polygons"]).read_text())["features"]
    polygons = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert len(polygons) == 1 and polygons[0].is_valid
    assert len(polygons[0].interiors) == 1
    assert polygons[0].exterior.is_ccw and not polygons[0].interiors[0].is_ccw
    assert features[0]["properties"]["area_m2"] == pytest.approx((160**2 - 100**2) * 0.0625, rel=0.01)


def test_crs_source_writes_a_geopackage_in_the_rasters_crs(scene, tmp_path):
    from pyogrio import list_layers, read_info

    cli = _script("vectorize")
    assert cli.main([str(scene.truth_mask), "--out", str(tmp_path), "--crs", "source"]) == 0
    gpkg = tmp_path / "scene.truth.gpkg"
    assert sorted(name for name, _ in list_layers(gpkg)) == ["centerlines", "polygons"]
    info = read_info(gpkg, layer="centerlines")
    assert info["crs"] == "EPSG:32618" and "length_m" in list(info["fields"])
    assert json.loads((tmp_path / "vectors.json").read_text())["tiles"][0]["geopackage"] == str(gpkg)


def test_lengths_are_metres_in_a_us_survey_feet_crs(tmp_path):
    metres = write_scene(tmp_path / "m", "s", height_px=400, width_px=400, seed=2, crs="EPSG:32618")
    feet = write_scene(tmp_path / "ft", "s", height_px=400, width_px=400, seed=2, crs="EPSG:3424")
    a = vectorize_raster(metres.truth_mask, tmp_path / "out_m", None)
    b = vectorize_raster(feet.truth_mask, tmp_path / "out_ft", None)
    assert a["pixel_size_m"] == pytest.approx(b["pixel_size_m"]) == pytest.approx(0.25)
    assert b["length_m"] == pytest.approx(a["length_m"], rel=1e-6)
    assert b["num_edges"] == a["num_edges"]


def test_a_geographic_raster_is_measured_in_its_utm_zone(tmp_path):
    lat = 40.2
    deg_lat = 0.25 / 111_000
    deg_lon = 0.25 / (111_320 * math.cos(math.radians(lat)))
    mask = np.zeros((200, 1000), np.uint8)
    mask[95:104, 50:950] = 1  # a straight sidewalk about 225 m long
    path = _write(tmp_path / "geo.tif", mask, "EPSG:4326", Affine(deg_lon, 0, -74.5, 0, -deg_lat, lat))
    summary = vectorize_raster(path, tmp_path / "out", None)
    assert summary["num_edges"] == 1
    assert summary["pixel_size_m"] == pytest.approx(0.25, rel=0.01)
    assert summary["length_m"] == pytest.approx(0.25 * 890, rel=0.02)  # the skeleton stops short of the ends


def test_a_probability_raster_needs_a_threshold(tmp_path, scene):
    with rasterio.open(scene.truth_mask) as src:
        truth = src.read(1)
    probability = np.where(truth == 1, 230, 40).astype(np.uint8)  # 0.91 and 0.16 on the 0-254 scale
    path = _write(tmp_path / "tile.prob.tif", probability)
    with pytest.raises(VectorInputError, match=r"tile\.prob\.tif.*--threshold"):
        vectorize_raster(path, tmp_path / "a", None)
    summary = vectorize_raster(path, tmp_path / "b", None, threshold=0.5)
    mask_summary = vectorize_raster(_write(tmp_path / "tile.mask.tif", truth), tmp_path / "c", None)
    assert summary["centerlines"].endswith("/tile.centerlines.geojson")
    assert (
        summary["num_edges"] == mask_summary["num_edges"] and summary["length_m"] == mask_summary["length_m"]
    )
    cli = _script("vectorize")
    assert cli.main([str(path), "--out", str(tmp_path / "d"), "--threshold"]) == 0  # VECTOR.THRESHOLD
    assert cli.main([str(path), "--out", str(tmp_path / "e")]) == 2


def test_missing_or_ungeoreferenced_rasters_are_named(tmp_path):
    with pytest.raises(VectorInputError, match="nothing.tif: no such file"):
        vectorize_raster(tmp_path / "nothing.tif", tmp_path, None)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", height=8, width=8, count=1, dtype="uint8") as dst:
        dst.write(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(VectorInputError, match="plain.tif: no CRS"):
        vectorize_raster(plain, tmp_path, None)


def test_a_tile_of_150k_speckles_finishes(tmp_path):
    mask = np.zeros((375 * 4, 400 * 5), np.uint8)
    mask[1::4, :] = np.tile([0, 1, 1, 1, 0], 400)  # 150,000 isolated 3-pixel speckles
    path = _write(tmp_path / "speckles.tif", mask, transform=Affine(0.05, 0, 560_000, 0, -0.05, 4_460_000))
    summary = vectorize_raster(path, tmp_path / "out", None)
    assert summary["num_edges"] == 0 and summary["num_polygons"] == 0


def test_score_network_cli_prints_and_writes_the_scores(scene, tmp_path, capsys):
    summary = vectorize_raster(scene.truth_mask, tmp_path, None)
    cli = _script("score_network")
    out = tmp_path / "scores.json"
    code = cli.main(
        [
            summary["centerlines"],
            str(scene.centerlines),
            "--buffer-m",
            "1",
            "2",
            "--json",
            str(out),
            "--pred-mask",
            str(scene.truth_mask),
            "--truth-mask",
            str(scene.truth_mask),
        ]
    )
    assert code == 0
    scores = json.loads(out.read_text())
    assert set(scores["buffers"]) == {"1", "2"} and scores["cldice"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "APLS" in printed and "clDice 1.0000" in printed
