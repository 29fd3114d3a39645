"""Each step of the vector pipeline on small hand-built masks and graphs: clean, skeleton graph, prune,
join, simplify."""

import numpy as np
import pytest

from sidewalk_hf.network.cleaning import area_m2_to_px, clean_mask, fill_small_holes, remove_small_objects
from sidewalk_hf.network.graph_ops import drop_small_components, find_spurs, join_gaps, prune_spurs, simplify
from sidewalk_hf.network.line_graph import LineGraph, canonical
from sidewalk_hf.network.skeleton_graph import skeleton_graph, skeleton_of


def _paths(graph):
    return sorted(p.tolist() for p in canonical(graph).paths())


# ------------------------------------------------------------------ cleaning


def test_small_objects_go_and_large_ones_stay():
    mask = np.zeros((40, 40), bool)
    mask[2:4, 2:4] = True  # 4 px
    mask[10:20, 10:20] = True  # 100 px
    out = remove_small_objects(mask, min_area_px=5)
    assert not out[2:4, 2:4].any() and out[10:20, 10:20].all()


def test_objects_touching_an_open_window_edge_are_kept_whatever_their_size():
    mask = np.zeros((20, 20), bool)
    mask[0:2, 5:7] = True  # touches the top edge
    assert remove_small_objects(mask, 10, open_edges=(True, False, False, False))[0:2, 5:7].all()
    assert not remove_small_objects(mask, 10).any()  # the top edge is the raster's: removed


def test_small_holes_are_filled_but_background_at_the_window_edge_is_not_a_hole():
    mask = np.ones((30, 30), bool)
    mask[10:12, 10:12] = False  # a 4 px hole
    mask[15:25, 15:25] = False  # a 100 px hole
    mask[0:2, 0:30] = False  # background along the top edge
    out = fill_small_holes(mask, min_area_px=10)
    assert out[10:12, 10:12].all() and not out[15:25, 15:25].any() and not out[0:2].any()


def test_area_thresholds_are_metres_at_the_pixel_size():
    assert area_m2_to_px(4.0, 0.25) == 64
    assert area_m2_to_px(4.0, 0.5) == 16
    assert area_m2_to_px(0.0, 0.25) == 0
    assert clean_mask(np.ones((4, 4), bool), 64, 64).sum() == 0


# ------------------------------------------------------------------ skeleton graph


def test_a_straight_line_is_one_edge_between_its_ends():
    skeleton = np.zeros((5, 9), bool)
    skeleton[2, 1:8] = True
    assert _paths(skeleton_graph(skeleton)) == [[[float(x), 2.0] for x in range(1, 8)]]


def test_a_cross_is_four_edges_at_one_junction():
    skeleton = np.zeros((9, 9), bool)
    skeleton[4, :] = True
    skeleton[:, 4] = True
    graph = canonical(skeleton_graph(skeleton))
    node_xy, _u, _v, degree = graph.nodes()
    assert graph.num_edges == 4
    assert sorted(degree.tolist()) == [1, 1, 1, 1, 4]
    assert node_xy[degree == 4].tolist() == [[4.0, 4.0]]


def test_a_loop_without_junctions_is_one_closed_edge_starting_at_its_first_pixel():
    skeleton = np.zeros((12, 12), bool)
    skeleton[2, 2:10] = skeleton[9, 2:10] = True
    skeleton[2:10, 2] = skeleton[2:10, 9] = True
    skeleton[2, 2] = skeleton[2, 9] = skeleton[9, 2] = skeleton[9, 9] = False  # 8-connected corners
    graph = canonical(skeleton_graph(skeleton))
    assert graph.num_edges == 1
    path = graph.edge(0)
    assert (path[0] == path[-1]).all() and path[0].tolist() == [2.0, 3.0]  # min (x, y) vertex
    assert len(path) >= 20


def test_a_2x2_blob_on_a_line_becomes_a_node_that_dissolves_into_the_line():
    skeleton = np.zeros((6, 12), bool)
    skeleton[2, 0:5] = True
    skeleton[2:4, 5:7] = True
    skeleton[3, 7:12] = True
    graph = canonical(skeleton_graph(skeleton))
    assert graph.num_edges == 1
    path = graph.edge(0)
    assert path[0].tolist() == [0.0, 2.0] and path[-1].tolist() == [11.0, 3.0]


def test_isolated_pixels_and_tiny_blobs_give_no_edges():
    skeleton = np.zeros((10, 10), bool)
    skeleton[1, 1] = True
    skeleton[5:7, 5:7] = True
    assert skeleton_graph(skeleton).num_edges == 0


def test_150k_isolated_speckles_build_a_graph_with_int64_ids_and_no_node_limit():
    skeleton = np.zeros((375 * 4, 400 * 5), bool)
    skeleton[1::4, :] = np.tile([False, True, True, True, False], 400)  # 150,000 three-pixel lines
    graph = skeleton_graph(skeleton)
    assert graph.num_edges == 150_000
    node_xy, u, _v, degree = graph.nodes()
    assert len(node_xy) == 300_000 and u.dtype == np.int64 and u.max() > 2**16
    assert (degree == 1).all()


def test_skeleton_of_a_bar_is_its_centre_line():
    mask = np.zeros((21, 61), bool)
    mask[6:15, 5:56] = True
    graph = canonical(skeleton_graph(skeleton_of(mask)))
    longest = max(graph.paths(), key=len)
    assert np.abs(longest[:, 1] - 10).max() <= 1.0
    assert longest[:, 0].max() - longest[:, 0].min() >= 40


# ------------------------------------------------------------------ prune, join, simplify (metres)


def _graph(*paths, joined=None):
    return LineGraph.from_paths([np.array(p, float) for p in paths], joined)


def test_spurs_shorter_than_the_length_are_pruned_repeatedly():
    main = [[0, 0], [10, 0], [20, 0]]
    spur = [[10, 0], [10, 2]]  # 2 m at a junction
    spur_of_spur = [[15, 0], [15, 1], [16, 2]]  # after the first round, [15,0] stays degree 3
    graph = _graph([[0, 0], [10, 0]], [[10, 0], [15, 0]], [[15, 0], [20, 0]], spur, spur_of_spur)
    pruned = prune_spurs(graph, 3.0)
    assert _paths(pruned) == [main[:1] + [[10.0, 0.0], [15.0, 0.0], [20.0, 0.0]]]
    assert not find_spurs(pruned, 3.0).any()


def test_a_short_branch_ending_on_a_protected_point_is_kept():
    graph = _graph([[0, 0], [10, 0]], [[10, 0], [20, 0]], [[10, 0], [10, 2]])
    kept = prune_spurs(graph, 3.0, protected=np.array([[10.0, 2.0]]))
    assert kept.num_edges == 3
    assert prune_spurs(graph, 3.0).num_edges == 1


def test_a_gap_between_two_components_is_joined_and_marked():
    graph = _graph([[0, 0], [10, 0]], [[13, 0], [25, 0]])
    joined = join_gaps(graph, gap_length=5.0)
    assert joined.num_components() == 1
    assert joined.joined.sum() == 1
    new = joined.edge(int(np.flatnonzero(joined.joined)[0]))
    assert sorted(map(tuple, new.tolist())) == [(10.0, 0.0), (13.0, 0.0)]


def test_gaps_longer_than_the_length_or_off_the_ends_direction_stay_open():
    assert join_gaps(_graph([[0, 0], [10, 0]], [[17, 0], [25, 0]]), gap_length=5.0).num_components() == 2
    # a parallel line 3 m beside it: each end would have to turn 71 degrees
    sideways = _graph([[0, 0], [10, 0]], [[11, 3], [25, 3]])
    assert join_gaps(sideways, gap_length=5.0, max_angle_deg=45).num_components() == 2


def test_a_join_onto_the_middle_of_a_line_splits_it():
    graph = _graph([[0, 0], [10, 0]], [[12, -10], [12, 10]])
    joined = canonical(join_gaps(graph, gap_length=5.0))
    node_xy, _, _, degree = joined.nodes()
    assert joined.num_components() == 1
    assert node_xy[degree == 3].tolist() == [[12.0, 0.0]]


def test_a_gap_in_a_loop_is_joined_when_the_way_round_is_long():
    # a 40 x 40 m block ring cut by a 3 m gap: connected the long way (157 m), so the gap is joined
    ring = [[3, 0], [40, 0], [40, 40], [0, 40], [0, 0]]
    joined = join_gaps(_graph(ring), gap_length=5.0, detour_factor=4.0)
    assert joined.joined.sum() == 1
    # the same ends with a short way round: no join
    hook = [[3, 0], [3, 2], [0, 2], [0, 0]]
    assert join_gaps(_graph(hook), gap_length=5.0, detour_factor=4.0).joined.sum() == 0


def test_two_facing_ends_get_one_join():
    joined = join_gaps(_graph([[0, 0], [10, 0]], [[12, 0], [20, 0]]), gap_length=5.0)
    assert joined.joined.sum() == 1


def test_small_components_go_unless_they_leave_the_tile():
    graph = _graph([[0, 0], [30, 0]], [[0, 10], [4, 10], [4, 14]], [[50, 50], [55, 50]])
    kept = drop_small_components(graph, 10.0, protected=np.array([[55.0, 50.0]]))
    assert sorted(p[0].tolist() for p in kept.paths()) == [[0.0, 0.0], [50.0, 50.0]]


def test_simplify_drops_staircase_vertices_zero_length_and_duplicate_edges():
    stairs = [[float(i // 2), float((i + 1) // 2)] for i in range(21)]
    graph = _graph(stairs, [[50, 50], [50, 50]], [[0, 30], [10, 30]], [[10, 30], [0, 30]])
    out = simplify(graph, 0.75)
    lengths = out.lengths()
    assert (lengths > 0).all()
    assert out.num_edges == 2
    assert min(len(p) for p in out.paths()) == 2


def test_canonical_form_does_not_depend_on_edge_order_or_direction():
    a = _graph([[0, 0], [5, 0]], [[5, 0], [5, 5]], [[5, 0], [9, 1]])
    b = _graph([[9, 1], [5, 0]], [[5, 0], [0, 0]], [[5, 5], [5, 0]])
    ca, cb = canonical(a), canonical(b)
    assert np.array_equal(ca.coords, cb.coords) and np.array_equal(ca.offsets, cb.offsets)


@pytest.mark.parametrize("length", [0.0, -1.0])
def test_disabled_thresholds_change_nothing(length):
    graph = _graph([[0, 0], [10, 0]], [[10, 0], [10, 1]], [[10, 0], [20, 0]])
    assert prune_spurs(graph, length).num_edges == 3
    assert join_gaps(graph, length).num_edges == 3
