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
DEFLATE_LEVEL = {"mask": 6, "prob": 2}  # see publish_cog


def temporary_path(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.tmp-{tag}-{os.getpid()}.tif")


def open_strip_writer(path: Path, profile: dict, height: int, transform, tags: dict, num_threads: int = 1):
    """A tiled, compressed, single-band uint8 GeoTIFF of ``height`` rows in the input's CRS and grid.

    A strip only lives until it is published as a COG (which compresses its pixels again, with deflate), so
    it is compressed with ZSTD at level 1: five times cheaper than deflate for about the same size. A GDAL
    without ZSTD writes it uncompressed; the published COG is the same either way. Its tiles are compressed
    on ``num_threads`` threads when it is closed.
    """
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
        compress="zstd",
        zstd_level=1,
        num_threads=max(1, num_threads),
        BIGTIFF="IF_SAFER",
    )
    dst.update_tags(**{k: str(v) for k, v in tags.items()})
    return dst


def publish_cog(source: Path, final: Path, num_threads: int = 1, deflate_level: int = 6) -> str:
    """Copy ``source`` to ``final`` as a COG (tiled, deflate, nearest-neighbour overviews) and return its sha256.

    Compressing the tiles is most of a COG's cost; ``num_threads`` compress them in parallel. The driver
    first writes the overviews to a temporary ZSTD file at GDAL's default level 9, a third of the rest of the
    work; level 1 is enough for a file read once. The COG is the same either way. ``deflate_level`` is
    GDAL's default 6 for masks; probabilities, whose noise deflate barely shrinks, take 2: half the time for
    a file 5 % larger (``DEFLATE_LEVEL``).
    """
    import rasterio
    from rasterio.shutil import copy as raster_copy

    staging = temporary_path(final, "cog")
    try:
        with rasterio.Env(ZSTD_LEVEL_OVERVIEW="1"):
            raster_copy(
                source,
                staging,
                driver="COG",
                COMPRESS="DEFLATE",
                LEVEL=str(deflate_level),
                BLOCKSIZE=BLOCK_PX,
                RESAMPLING="NEAREST",
                OVERVIEWS="AUTO",
                BIGTIFF="IF_SAFER",
                NUM_THREADS=str(max(1, num_threads)),
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
    logit_sum: np.ndarray,
    weight_sum: np.ndarray,
    valid: np.ndarray,
    sidewalk_label: int,
    with_probability: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blended logits -> (class mask uint8, sidewalk probability uint8 0-254 or None), 255 where not valid.

    The blend divides every label's sum by the same positive weight, which cannot reverse two labels' order:
    classes are taken from the sums themselves, so the mask is the same with or without the probability, which
    alone pays for the division and the softmax (in place in one float32 array). The inputs are left untouched.
    """
    covered = valid & (weight_sum > 0)
    classes = first_argmax(logit_sum)
    classes[~covered] = NODATA
    if not with_probability:
        return classes, None
    logits = logit_sum / np.maximum(weight_sum, 1e-12)[None]
    logits -= logits.max(axis=0, keepdims=True)
    exp = np.exp(logits, out=logits)
    probability = exp[sidewalk_label] / exp.sum(axis=0)
    probability *= 254
    prob_u8 = np.rint(probability, out=probability).astype(np.uint8)
    prob_u8[~covered] = NODATA
    return classes, prob_u8


def first_argmax(values: np.ndarray) -> np.ndarray:
    """``np.argmax(values, axis=0)`` as uint8 (the first of equal maxima), by one comparison per label.

    numpy's argmax over the leading axis makes one small reduction per pixel; comparing whole planes is
    many times faster. NaNs (which argmax ranks first) go to argmax itself.
    """
    if len(values) > 256 or np.isnan(values).any():
        return np.argmax(values, axis=0).astype(np.uint8)
    classes = np.zeros(values.shape[1:], np.uint8)
    best = values[0]
    for label in range(1, len(values)):
        better = values[label] > best
        classes[better] = label
        best = np.maximum(best, values[label])
    return classes
