"""Network scores on hand-built line layers: buffers (Wiedemann), APLS, junctions, components, clDice."""

import json

import numpy as np
import pytest
import shapely

from sidewalk_hf.network.scoring import (
    LayerError,
    apls,
    buffer_scores,
    cldice,
    count_components,
    format_table,
    junction_scores,
    node_lines,
    read_lines,
    score_files,
    score_lines,
)


def _grid(step=50.0, n=3, shift=(0.0, 0.0)):
    """A street grid of sidewalk lines: n horizontal and n vertical lines crossing, as long polylines."""
    extent = step * (n - 1)
    lines = [shapely.LineString([(0, i * step), (extent, i * step)]) for i in range(n)]
    lines += [shapely.LineString([(i * step, 0), (i * step, extent)]) for i in range(n)]
    return np.array([shapely.affinity.translate(line, *shift) for line in lines], dtype=object)


def test_identical_layers_score_one_everywhere():
    scores = score_lines(_grid(), _grid(), buffers_m=(1.0,))
    assert scores["buffers"]["1"] == pytest.approx({"completeness": 1.0, "correctness": 1.0, "quality": 1.0})
    assert scores["apls"] == pytest.approx(1.0)
    assert scores["junction_precision"] == scores["junction_recall"] == 1.0
    assert scores["components_pred"] == scores["components_truth"] == 1
    assert "APLS 1.0000" in format_table(scores)


def test_buffer_scores_follow_the_buffer_width():
    shifted = node_lines(_grid(shift=(0.0, 1.5)))
    truth = node_lines(_grid())
    at_1 = buffer_scores(truth, shifted, 1.0)
    at_2 = buffer_scores(truth, shifted, 2.0)
    assert at_1["completeness"] == pytest.approx(0.5, abs=0.02)  # the vertical lines still match
    assert at_2["completeness"] == pytest.approx(1.0, abs=0.02) and at_2["correctness"] == pytest.approx(
        1.0, abs=0.02
    )
    c, r = at_1["completeness"], at_1["correctness"]
    assert at_1["quality"] == pytest.approx(c * r / (c - c * r + r))


def test_crossing_polylines_are_noded_into_junctions():
    parts = node_lines(_grid(n=3))
    assert len(parts) == 12  # 6 lines, each cut twice
    # a line whose end stops on another line's middle (a T) makes a junction too
    t_shape = np.array([shapely.LineString([(0, 0), (20, 0)]), shapely.LineString([(10, 0.01), (10, 15)])])
    scores = junction_scores(node_lines(t_shape), node_lines(t_shape), 1.0)
    assert scores["num_junctions_truth"] == 1
    assert count_components(node_lines(t_shape)) == 1


def test_a_gap_in_the_prediction_lowers_apls_and_splits_components():
    truth = node_lines(_grid())
    cut = shapely.difference(shapely.union_all(_grid()), shapely.box(20, -5, 30, 5))  # 10 m gap in y=0 line
    pred = node_lines(shapely.get_parts(cut))
    broken = apls(truth, pred)
    assert 0.5 < broken["apls"] < 0.99
    assert apls(truth, node_lines(np.array([], dtype=object)))["apls"] == 0.0
    isolated = np.concatenate([_grid(), [shapely.LineString([(200, 200), (220, 200)])]])
    assert count_components(node_lines(isolated)) == 2


def test_junctions_match_one_to_one_within_the_radius():
    truth = node_lines(_grid())
    moved = node_lines(_grid(shift=(2.5, 0.0)))
    assert junction_scores(truth, moved, 3.0)["junction_recall"] == 1.0
    assert junction_scores(truth, moved, 2.0)["junction_recall"] == 0.0


def test_cldice_of_masks():
    mask = np.zeros((60, 60), bool)
    mask[28:33, 5:55] = True
    assert cldice(mask, mask)["cldice"] == pytest.approx(1.0)
    assert cldice(mask, np.roll(mask, 20, axis=0))["cldice"] == 0.0
    half = mask.copy()
    half[:, 30:] = False
    partial = cldice(half, mask)
    assert partial["topology_precision"] == 1.0 and 0.3 < partial["topology_sensitivity"] < 0.7


def test_files_in_different_crs_are_compared_in_one_metric_frame(tmp_path):
    from pyproj import Transformer

    x0, y0 = 560_000.0, 4_460_000.0
    grid = [shapely.affinity.translate(line, x0, y0) for line in _grid()]
    truth = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "EPSG:32618"}},
        "features": [
            {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(g)} for g in grid
        ],
    }
    to_wgs84 = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    pred = {
        "type": "FeatureCollection",  # RFC 7946: lon/lat, no crs member
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": shapely.geometry.mapping(
                    shapely.transform(g, lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))
                ),
            }
            for g in grid
        ],
    }
    (tmp_path / "truth.geojson").write_text(json.dumps(truth))
    (tmp_path / "pred.geojson").write_text(json.dumps(pred))
    lines, crs = read_lines(tmp_path / "pred.geojson")
    assert crs.to_epsg() == 4326 and len(lines) == 6
    scores = score_files(tmp_path / "pred.geojson", tmp_path / "truth.geojson", buffers_m=(0.5,))
    assert scores["frame"] == "EPSG:32618"
    assert scores["buffers"]["0.5"]["completeness"] == pytest.approx(1.0, abs=1e-6)
    assert scores["apls"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(LayerError, match="no such file"):
        score_files(tmp_path / "missing.geojson", tmp_path / "truth.geojson")
