"""Removing small objects and small holes from a mask, with thresholds in pixels of the raster.

Both work on a window of a larger raster: a component that touches an edge of the window which is not
an edge of the raster may continue outside, so it is never removed or filled. A component of fewer than
``n`` pixels spans fewer than ``n`` pixels, so with a halo wider than a small object's extent the result
in a block's core is the one of cleaning the whole raster at once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def area_m2_to_px(area_m2: float, pixel_size_m: float) -> int:
    """Pixels covering ``area_m2`` (rounded up): the threshold used for objects and holes."""
    if area_m2 <= 0:
        return 0
    return int(np.ceil(area_m2 / pixel_size_m**2))


def _touching_labels(labels: np.ndarray, open_edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Labels present on the chosen window edges (top, bottom, left, right)."""
    edges = []
    for is_open, strip in zip(open_edges, (labels[0], labels[-1], labels[:, 0], labels[:, -1])):
        if is_open:
            edges.append(strip)
    return np.unique(np.concatenate(edges)) if edges else np.zeros(0, dtype=labels.dtype)


def remove_small_objects(
    mask: np.ndarray, min_area_px: int, open_edges: tuple[bool, bool, bool, bool] = (False,) * 4
) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_area_px`` pixels.

    ``open_edges`` (top, bottom, left, right) marks window edges inside the raster: components touching
    them are kept whatever their size.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_area_px <= 1 or not mask.any():
        return mask.copy()
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_area_px
    keep[_touching_labels(labels, open_edges)] = True
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """``mask`` with its holes (4-connected background not touching the window) of fewer than
    ``min_area_px`` pixels filled. Background touching any window edge is never a hole here: at the
    raster's edge it is not enclosed, at a block's edge it may continue."""
    mask = np.asarray(mask, dtype=bool)
    if min_area_px <= 1 or mask.all():
        return mask.copy()
    labels, count = ndimage.label(~mask, structure=FOUR_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    fill = sizes < min_area_px
    fill[_touching_labels(labels, (True, True, True, True))] = False
    fill[0] = False
    return mask | fill[labels]


def clean_mask(
    mask: np.ndarray,
    min_object_px: int,
    min_hole_px: int,
    open_edges: tuple[bool, bool, bool, bool] = (False,) * 4,
) -> np.ndarray:
    """Small objects removed, then small holes filled (the order keeps a speckle inside a hole from
    saving the hole)."""
    return fill_small_holes(remove_small_objects(mask, min_object_px, open_edges), min_hole_px)
