"""Quality on the synthetic truth: the network from a scene's true mask against its true centerlines,
with gaps injected into the mask, and with bumps that make spurs."""

import numpy as np
import pytest
import rasterio
from scipy import ndimage
from skimage.morphology import skeletonize

from sidewalk_hf.data.scene import write_scene
from sidewalk_hf.network.graph_ops import find_spurs
from sidewalk_hf.network.line_graph import LineGraph
from sidewalk_hf.network.scoring import read_lines, score_files, to_metric
from sidewalk_hf.network.vectorize import EDGE_MARGIN_M, vectorize_raster

GSD_M = 0.25
BUFFER_M = max(1.0, 2 * GSD_M)  # 1 m, or 2 px at a coarser scene scale


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(
        tmp_path_factory.mktemp("scene"), "scene", height_px=1000, width_px=1000, seed=3, gsd_m=GSD_M
    )


@pytest.fixture(scope="module")
def truth_scores(scene, tmp_path_factory):
    out = vectorize_raster(scene.truth_mask, tmp_path_factory.mktemp("vectors"), None)
    return score_files(out["centerlines"], scene.centerlines, buffers_m=(BUFFER_M,))


def _edited_mask(scene, tmp_path, name, edit):
    with rasterio.open(scene.truth_mask) as src:
        mask, profile = src.read(1), src.profile
    edited = edit(mask.copy())
    path = tmp_path / f"{name}.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(edited[None])
    return path


def test_true_mask_gives_the_true_centerlines(truth_scores):
    at_buffer = truth_scores["buffers"][f"{BUFFER_M:g}"]
    assert at_buffer["completeness"] >= 0.98
    assert at_buffer["correctness"] >= 0.98
    assert truth_scores["apls"] >= 0.98
    assert truth_scores["components_pred"] == truth_scores["components_truth"]
    assert truth_scores["junction_recall"] >= 0.95


def _cut_gaps(mask, count=12, half_px=5, seed=0):
    """Squares of 2.5 m cut across sidewalks, away from junctions and the scene's edge."""
    skeleton = skeletonize(mask == 1)
    neighbours = ndimage.convolve(skeleton.astype(int), np.ones((3, 3), int), mode="constant") - 1
    far_from_junction = ndimage.distance_transform_edt(~(skeleton & (neighbours >= 3))) > 40
    candidates = np.argwhere(skeleton & (neighbours == 2) & far_from_junction)
    candidates = candidates[(candidates.min(axis=1) > 20) & (candidates.max(axis=1) < min(mask.shape) - 20)]
    rng = np.random.default_rng(seed)
    for y, x in candidates[rng.choice(len(candidates), count, replace=False)]:
        window = mask[y - half_px : y + half_px, x - half_px : x + half_px]
        window[window == 1] = 0
    return mask


def test_gaps_cost_apls_without_joining_and_joining_restores_it(scene, tmp_path, truth_scores):
    gapped = _edited_mask(scene, tmp_path, "gapped", _cut_gaps)
    scores = {}
    for gap_m in (0.0, 6.0):  # the cuts leave gaps of about 4.5 m of skeleton
        out = vectorize_raster(gapped, tmp_path / f"gap{gap_m:g}", {"GAP_LENGTH_M": gap_m})
        scores[gap_m] = (out, score_files(out["centerlines"], scene.centerlines, buffers_m=(BUFFER_M,)))
    (plain, without), (joined, with_joins) = scores[0.0], scores[6.0]
    assert plain["num_joined"] == 0 and joined["num_joined"] >= 10
    assert without["apls"] < truth_scores["apls"] - 0.05  # the gaps show
    assert with_joins["apls"] >= 0.95
    assert with_joins["components_pred"] == with_joins["components_truth"]


def _add_bumps(mask, count=200, seed=1):
    """Discs of 0.75-2 m radius centred on the sidewalks' outline."""
    rng = np.random.default_rng(seed)
    outline = np.argwhere((mask == 1) & ~ndimage.binary_erosion(mask == 1))
    yy, xx = np.mgrid[-9:10, -9:10]
    for y, x in outline[rng.choice(len(outline), count, replace=False)]:
        radius = rng.uniform(3, 8)
        disc = (yy**2 + xx**2) <= radius**2
        ys, xs = yy[disc] + y, xx[disc] + x
        inside = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
        mask[ys[inside], xs[inside]] = 1
    return mask


def _network_in_metres(path, crs):
    lines, source = read_lines(path)
    lines = to_metric(lines, source, crs, 1.0)
    import shapely

    return LineGraph.from_paths([shapely.get_coordinates(line) for line in lines])


def test_bumps_leave_no_spur_shorter_than_the_prune_length(scene, tmp_path):
    from pyproj import CRS

    bumpy = _edited_mask(scene, tmp_path, "bumpy", _add_bumps)
    spur_m = 3.0
    crs = CRS.from_user_input(scene.crs)
    x0, y0 = scene.transform[2], scene.transform[5]
    size_m = 1000 * GSD_M

    def protected(graph):  # ends where a sidewalk leaves the scene are never spurs
        node_xy, _, _, degree = graph.nodes()
        ends = node_xy[degree == 1]
        to_edge = np.minimum.reduce(
            [ends[:, 0] - x0, x0 + size_m - ends[:, 0], y0 - ends[:, 1], ends[:, 1] - y0 + size_m]
        )
        return ends[to_edge <= EDGE_MARGIN_M + 0.5]

    unpruned = vectorize_raster(bumpy, tmp_path / "unpruned", {"SPUR_LENGTH_M": 0.0, "GAP_LENGTH_M": 0.0})
    graph = _network_in_metres(unpruned["centerlines"], crs)
    assert find_spurs(graph, spur_m, protected(graph)).sum() >= 50  # the bumps did make spurs

    pruned = vectorize_raster(bumpy, tmp_path / "pruned", {"SPUR_LENGTH_M": spur_m})
    graph = _network_in_metres(pruned["centerlines"], crs)
    assert not find_spurs(graph, spur_m, protected(graph)).any()
    assert pruned["num_components"] == 1
