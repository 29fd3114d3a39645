"""The vector stage's engines: a failed tile is recorded and the run goes on; Ray gives the local network."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from sidewalk_hf.data.scene import split_into_tiles, write_scene
from sidewalk_hf.network.vectorize import output_stem

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("run.centerlines.geojson", "run.polygons.geojson")


def _vectorize_cli():
    spec = importlib.util.spec_from_file_location("vectorize", REPO / "scripts" / "vectorize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """A scene's true mask as 2 x 2 tiles, and a probability raster in another CRS (so not in their mosaic)
    that fails as a mask."""
    folder = tmp_path_factory.mktemp("tiles")
    scene = write_scene(folder, "scene", height_px=300, width_px=360, seed=3)
    tiles = split_into_tiles(scene.truth_mask, 2, 2, folder / "tiles")
    with rasterio.open(tiles[0]) as src:
        profile = src.profile | {"crs": "EPSG:32617"}
    not_a_mask = folder / "not_a_mask.tif"
    with rasterio.open(not_a_mask, "w", **profile) as dst:
        dst.write(np.full((1, profile["height"], profile["width"]), 120, np.uint8))
    return tiles, not_a_mask


def _summaries(out: Path) -> list[dict]:
    report = json.loads((out / "vectors.json").read_text())
    drop = ("seconds", "centerlines", "polygons", "geopackage")
    return [{k: v for k, v in tile.items() if k not in drop} for tile in report["tiles"] + [report["run"]]]


def test_a_failed_tile_is_named_and_the_other_tiles_still_merge(tiles, tmp_path, capsys):
    good, not_a_mask = tiles
    cli = _vectorize_cli()
    assert cli.main([*map(str, good), str(not_a_mask), "--out", str(tmp_path / "with")]) == 1
    assert f"FAILED not_a_mask ({not_a_mask}): VectorInputError" in capsys.readouterr().err
    assert cli.main([*map(str, good), "--out", str(tmp_path / "without")]) == 0
    for name in OUTPUTS:  # the run's network is that of the tiles that succeeded
        assert (tmp_path / "with" / name).read_text() == (tmp_path / "without" / name).read_text()
    report = json.loads((tmp_path / "with" / "vectors.json").read_text())
    assert report["failed"] == ["not_a_mask"] and report["engine"] == "local"
    assert [t["status"] for t in report["tiles"]] == ["ok"] * 4 + ["failed"]
    assert "--threshold" in report["tiles"][-1]["error"]


@pytest.mark.slow
def test_the_ray_engine_on_a_local_cluster_equals_the_local_engine(tiles, tmp_path):
    ray = pytest.importorskip("ray")
    good, not_a_mask = tiles
    inputs = [*map(str, good), str(not_a_mask)]
    cli = _vectorize_cli()
    assert cli.main([*inputs, "--out", str(tmp_path / "local")]) == 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli.main([*inputs, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 1
    finally:
        ray.shutdown()
    names = [
        *OUTPUTS,
        *(f"{output_stem(t)}.{kind}.geojson" for t in good for kind in ("centerlines", "polygons")),
    ]
    for name in names:
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text(), name
    assert _summaries(tmp_path / "ray") == _summaries(tmp_path / "local")
    report = json.loads((tmp_path / "ray" / "vectors.json").read_text())
    assert report["engine"] == "ray" and report["failed"] == ["not_a_mask"]
    assert not list((tmp_path / "ray").glob(".*"))  # the run's VRT mosaics are gone
