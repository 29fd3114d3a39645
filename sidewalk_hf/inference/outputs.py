"""Output rasters: written strip by strip into a tiled GeoTIFF, then published as a Cloud-Optimized GeoTIFF.

A finished output appears under its final name only by a rename, after it is complete: a run killed at any
moment leaves at most hidden temporary files (``.<name>.tmp-*``), never a half-written mask that could be
taken for a finished one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

NODATA = 255
BLOCK_PX = 512


def temporary_path(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.tmp-{tag}-{os.getpid()}.tif")


def open_strip_writer(path: Path, profile: dict, height: int, transform, tags: dict):
    """A tiled, compressed, single-band uint8 GeoTIFF of ``height`` rows in the input's CRS and grid."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    dst = rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=profile["width"],
        height=height,
        count=1,
        dtype="uint8",
        nodata=NODATA,
        crs=profile.get("crs"),
        transform=transform,
        tiled=True,
        blockxsize=BLOCK_PX,
        blockysize=BLOCK_PX,
        compress="deflate",
        BIGTIFF="IF_SAFER",
    )
    dst.update_tags(**{k: str(v) for k, v in tags.items()})
    return dst


def publish_cog(source: Path, final: Path) -> str:
    """Copy ``source`` to ``final`` as a COG (tiled, deflate, nearest-neighbour overviews) and return its sha256."""
    from rasterio.shutil import copy as raster_copy

    staging = temporary_path(final, "cog")
    try:
        raster_copy(
            source,
            staging,
            driver="COG",
            COMPRESS="DEFLATE",
            BLOCKSIZE=BLOCK_PX,
            RESAMPLING="NEAREST",
            OVERVIEWS="AUTO",
            BIGTIFF="IF_SAFER",
        )
        digest = sha256_of(staging)
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)
        Path(f"{staging}.aux.xml").unlink(missing_ok=True)
    return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def classes_and_probability(
    logit_sum: np.ndarray, weight_sum: np.ndarray, valid: np.ndarray, sidewalk_label: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blended logits -> (class mask uint8, sidewalk probability uint8 0-254), 255 where not valid."""
    covered = valid & (weight_sum > 0)
    logits = logit_sum / np.maximum(weight_sum, 1e-12)[None]
    classes = np.argmax(logits, axis=0).astype(np.uint8)
    shifted = logits - logits.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    probability = exp[sidewalk_label] / exp.sum(axis=0)
    prob_u8 = np.rint(probability * 254).astype(np.uint8)
    classes[~covered] = NODATA
    prob_u8[~covered] = NODATA
    return classes, prob_u8
