"""Blocks and tiles: processing in blocks with a halo, or as a mosaic of tiles, gives the network of the
whole raster at once (same edges, same coordinates, same components)."""

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from sidewalk_hf.data.scene import split_into_tiles, write_scene
from sidewalk_hf.network import vectorize as vectorize_module
from sidewalk_hf.network.blocks import block_grid, clip_to_core, merge_pieces
from sidewalk_hf.network.skeleton_graph import skeleton_graph, skeleton_of
from sidewalk_hf.network.vectorize import vectorize_raster, vectorize_run


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"), "scene", height_px=900, width_px=1100, seed=5)


def _read_mask(path):
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1) == 1


def _blocked_graph(mask, block_px, halo_px):
    pieces = []
    for block in block_grid(*mask.shape, block_px, halo_px):
        r0, r1, c0, c1 = block.window
        graph = skeleton_graph(skeleton_of(mask[r0:r1, c0:c1]), origin=(r0, c0))
        pieces.append(clip_to_core(graph, block.core))
    return merge_pieces(pieces)


@pytest.mark.parametrize("block_px, halo_px", [(256, 40), (97, 30), (300, 25)])
def test_blocked_skeleton_graph_equals_the_whole_raster_graph(scene, block_px, halo_px):
    mask = _read_mask(scene.truth_mask)
    whole = _blocked_graph(mask, 10**6, 0)
    blocked = _blocked_graph(mask, block_px, halo_px)
    assert whole.num_edges > 50
    assert np.array_equal(whole.offsets, blocked.offsets)
    assert np.array_equal(whole.coords, blocked.coords)  # bit for bit: far within 1e-6 of a pixel
    assert whole.num_components() == blocked.num_components()


def test_pieces_meet_at_cut_points_on_the_block_border():
    mask = np.zeros((40, 40), bool)
    mask[18:23, 2:38] = True  # a bar across a vertical block border at column 20
    blocks = block_grid(40, 40, 20, 10)
    pieces = [
        clip_to_core(
            skeleton_graph(
                skeleton_of(mask[b.window[0] : b.window[1], b.window[2] : b.window[3]]),
                origin=(b.window[0], b.window[2]),
            ),
            b.core,
        )
        for b in blocks
    ]
    ends = [p.coords[p.offsets[1:] - 1] for p in pieces if p.num_edges] + [
        p.coords[p.offsets[:-1]] for p in pieces if p.num_edges
    ]
    assert any((e[:, 0] == 19.5).any() for e in ends)  # the cut lies half-way between pixel centres
    merged = merge_pieces(pieces)
    assert merged.num_edges == 1 and not (merged.coords % 1).any()  # cut point removed after the merge


@pytest.mark.parametrize("polygons_whole_tile", [True, False])
def test_vectorize_raster_in_blocks_writes_the_same_centerlines(
    scene, tmp_path, monkeypatch, polygons_whole_tile
):
    if not polygons_whole_tile:  # polygons per block, united across block borders (tiles too large at once)
        monkeypatch.setattr(vectorize_module, "WHOLE_TILE_POLYGONS_PX", 0)
    whole = vectorize_raster(scene.truth_mask, tmp_path / "whole", {"BLOCK_SIZE_M": 10_000})
    blocked = vectorize_raster(scene.truth_mask, tmp_path / "blocked", {"BLOCK_SIZE_M": 64, "HALO_M": 12})
    assert whole["num_blocks"] == 1 and blocked["num_blocks"] == 20  # 256-px blocks over 900 x 1100
    with open(whole["centerlines"]) as a, open(blocked["centerlines"]) as b:
        assert a.read() == b.read()
    areas = [
        sum(f["properties"]["area_m2"] for f in json.loads(Path(s["polygons"]).read_text())["features"])
        for s in (whole, blocked)
    ]
    assert areas[1] == pytest.approx(areas[0], rel=0.002)


def _metric_lines(path, crs="EPSG:32618"):
    from sidewalk_hf.network.scoring import read_lines, to_metric

    lines, source = read_lines(path)
    from pyproj import CRS

    return to_metric(lines, source, CRS.from_user_input(crs), 1.0)


def test_a_mosaic_of_tiles_merges_into_the_whole_rasters_network(scene, tmp_path):
    tiles = split_into_tiles(scene.truth_mask, 2, 2, tmp_path / "tiles")
    report = vectorize_run(tiles, tmp_path / "run", None)
    whole = vectorize_raster(scene.truth_mask, tmp_path / "whole", None)
    assert len(report["tiles"]) == 4 and report["run"]["num_edges"] == whole["num_edges"]
    assert report["run"]["num_components"] == whole["num_components"]
    run_lines = _metric_lines(report["run"]["centerlines"])
    whole_lines = _metric_lines(whole["centerlines"])
    key = lambda g: tuple(np.round(shapely.get_coordinates(g)[0], 3))
    for a, b in zip(sorted(run_lines, key=key), sorted(whole_lines, key=key)):
        assert np.abs(shapely.get_coordinates(a) - shapely.get_coordinates(b)).max() < 1e-6
    tile_names = {
        f["properties"]["tile"]
        for f in json.loads(Path(report["run"]["centerlines"]).read_text())["features"]
    }
    assert tile_names == {vectorize_module.output_stem(t) for t in tiles}
    # each tile's own network keeps its lines up to the tile border (ends there are not pruned)
    per_tile = sum(t["length_m"] for t in report["tiles"])
    assert per_tile == pytest.approx(whole["length_m"], rel=0.03)


def test_halo_reads_across_tiles(scene, tmp_path):
    tiles = split_into_tiles(scene.truth_mask, 1, 2, tmp_path / "tiles")
    mosaics = vectorize_module._group_into_mosaics(tiles, tmp_path)
    assert len(mosaics) == 1 and mosaics[0][0].path.endswith(".vrt")
    assert mosaics[0][0].areas == [(0, 900, 0, 550), (0, 900, 550, 1100)]
