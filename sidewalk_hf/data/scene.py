"""Large georeferenced synthetic scenes: a GeoTIFF orthophoto with its true mask and true centerlines.

Large-area inference, the sidewalk network and datasets built from geodata are tested on what a mapping
team has: a georeferenced raster in a projected CRS, plus the truth in the same CRS. This module renders
one scene with the chip renderer of ``synthetic.py`` (same street grid, materials, trees, shadows, camera),
at a fixed ground resolution instead of a per-chip one, and writes

- ``<name>.tif``: the image, 3-band RGB (or 4-band NIR, R, G, B), uint8 or uint16 (uint8 value x 257, so
  ``fixed:0,65535`` scaling gives back the uint8 image exactly), optional nodata columns on the left edge
  (nodata value 0; valid pixels are at least 1 so that a dark pixel is never read as nodata);
- ``<name>.truth.tif``: uint8, 0 background, 1 sidewalk (crossings included, also under tree canopies),
  255 where the image is nodata;
- ``<name>.centerlines.geojson``: the true sidewalk centerlines as LineStrings in the scene's CRS (named in
  a ``crs`` member, as GDAL writes GeoJSON in a projected CRS), each with ``width_m``, the sidewalk's width.

Scale: ``px`` = 1 in the chip renderer is a 256-px chip's pixel, a sidewalk about 7.5 px wide, which is
about 0.25 m per pixel for a 1.9 m sidewalk. A scene at ``gsd_m`` uses ``px = 0.25 / gsd_m``, so the demo
model, trained on 128-px chips (``px`` about 0.5), sees its training scale on a scene at ``gsd_m = 0.5``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

REFERENCE_GSD_M = 0.25  # ground resolution of px = 1 in the chip renderer
US_SURVEY_FOOT_M = 1200 / 3937


@dataclass(frozen=True)
class SceneFiles:
    """The files of one written scene and its georeference."""

    image: Path
    truth_mask: Path
    centerlines: Path
    crs: str
    transform: tuple[float, ...]  # affine (a, b, c, d, e, f) of the rasters
    gsd_m: float
    sidewalk_width_m: float


def _crs_unit_metres(crs) -> float:
    factor = crs.linear_units_factor[1] if crs.is_projected else None
    if factor is None:
        raise ValueError(f"the scene CRS must be projected (metres or feet), got {crs.to_string()}")
    return float(factor)


def _default_origin(crs) -> tuple[float, float]:
    """A plausible upper-left corner in New Jersey for the CRSs the tests use, else (0, 0) + a margin."""
    epsg = crs.to_epsg()
    if epsg == 32618:  # UTM 18N, metres
        return 560_000.0, 4_460_000.0
    if epsg == 3424:  # New Jersey State Plane, US survey feet
        return 600_000.0, 700_000.0
    return 10_000.0, 10_000.0


def write_scene(
    out_dir: str | os.PathLike,
    name: str = "scene",
    *,
    height_px: int,
    width_px: int,
    seed: int = 0,
    crs: str = "EPSG:32618",
    gsd_m: float = 0.25,
    num_bands: int = 3,
    dtype: str = "uint8",
    nodata_border_px: int = 0,
    occluded_sidewalk_fraction: float = 0.07,
    origin: tuple[float, float] | None = None,
) -> SceneFiles:
    """Render and write one scene; the same arguments give the same files."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    from .synthetic import IGNORE, render_scene  # the renderer (and its datasets import) only to render

    if num_bands not in (3, 4):
        raise ValueError(f"num_bands must be 3 (R, G, B) or 4 (NIR, R, G, B), got {num_bands}")
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype must be uint8 or uint16, got {dtype!r}")
    if not 0 <= nodata_border_px < width_px:
        raise ValueError(f"nodata_border_px must be in [0, width_px), got {nodata_border_px}")
    crs_obj = CRS.from_user_input(crs)
    unit_m = _crs_unit_metres(crs_obj)
    pixel_size = gsd_m / unit_m
    x0, y0 = origin if origin is not None else _default_origin(crs_obj)
    transform = Affine(pixel_size, 0.0, x0, 0.0, -pixel_size, y0)

    rng = np.random.default_rng([seed, 7_700_001, height_px, width_px])
    scene = render_scene(rng, height_px, width_px, REFERENCE_GSD_M / gsd_m, occluded_sidewalk_fraction)
    rgb = scene.image.transpose(2, 0, 1)  # (3, H, W)
    if num_bands == 4:
        r, g, b = (band.astype(np.float32) for band in rgb)
        vegetation = np.clip((g - 0.5 * (r + b)) / 40.0, 0, 1)  # green canopies and lawns shine in NIR
        nir = np.clip(0.35 * r + 0.45 * g + 0.2 * b + 110 * vegetation, 0, 255).astype(np.uint8)
        bands = np.concatenate([nir[None], rgb])
    else:
        bands = rgb
    truth = scene.mask.copy()
    nodata = None
    if nodata_border_px:
        nodata = 0
        bands = np.maximum(bands, 1)
        bands[:, :, :nodata_border_px] = 0
        truth[:, :nodata_border_px] = IGNORE
    if dtype == "uint16":
        bands = bands.astype(np.uint16) * 257

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "height": height_px,
        "width": width_px,
        "crs": crs_obj,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    image_path, truth_path = out_dir / f"{name}.tif", out_dir / f"{name}.truth.tif"
    with rasterio.open(
        image_path, "w", count=len(bands), dtype=dtype, nodata=nodata, photometric="minisblack", **profile
    ) as dst:
        dst.write(bands)
        dst.descriptions = (
            ("nir", "red", "green", "blue")[-len(bands) :] if num_bands == 4 else ("red", "green", "blue")
        )
    with rasterio.open(truth_path, "w", count=1, dtype="uint8", nodata=IGNORE, **profile) as dst:
        dst.write(truth[None])

    width_m = scene.sidewalk_width_px * gsd_m
    features = []
    for line in scene.centerlines:
        coords = [[x0 + x * pixel_size, y0 - y * pixel_size] for x, y in line]
        features.append(
            {
                "type": "Feature",
                "properties": {"highway": "footway", "footway": "sidewalk", "width_m": round(width_m, 4)},
                "geometry": {"type": "LineString", "coordinates": coords},
            }
        )
    centerlines_path = out_dir / f"{name}.centerlines.geojson"
    centerlines_path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "crs": {"type": "name", "properties": {"name": crs_obj.to_string()}},
                "features": features,
            }
        )
    )
    return SceneFiles(
        image=image_path,
        truth_mask=truth_path,
        centerlines=centerlines_path,
        crs=crs_obj.to_string(),
        transform=tuple(transform)[:6],
        gsd_m=gsd_m,
        sidewalk_width_m=width_m,
    )


def split_into_tiles(
    raster: str | os.PathLike, rows: int, cols: int, out_dir: str | os.PathLike
) -> list[Path]:
    """Cut a raster into ``rows`` x ``cols`` GeoTIFF tiles (windowed copies), as orthophotos are delivered."""
    import rasterio
    from rasterio.windows import Window

    raster, out_dir = Path(raster), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(raster) as src:
        row_edges = np.linspace(0, src.height, rows + 1).round().astype(int)
        col_edges = np.linspace(0, src.width, cols + 1).round().astype(int)
        for i in range(rows):
            for j in range(cols):
                window = Window(
                    col_edges[j],
                    row_edges[i],
                    col_edges[j + 1] - col_edges[j],
                    row_edges[i + 1] - row_edges[i],
                )
                profile = src.profile | {
                    "height": window.height,
                    "width": window.width,
                    "transform": src.window_transform(window),
                }
                path = out_dir / f"{raster.stem}_r{i}c{j}.tif"
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(src.read(window=window))
                paths.append(path)
    return paths


def write_mosaic_vrt(tiles: list[str | os.PathLike], path: str | os.PathLike) -> Path:
    """A GDAL VRT mosaic of tiles that share a CRS, resolution, band count and data type.

    What ``gdalbuildvrt`` writes for such tiles, for machines that have rasterio but not the GDAL tools.
    """
    import rasterio

    path = Path(path)
    infos = []
    for tile in tiles:
        with rasterio.open(tile) as src:
            infos.append((Path(tile).resolve(), src.profile, src.bounds, src.res))
    _, first, _, (res_x, res_y) = infos[0]
    for tile, profile, _, res in infos[1:]:
        if (profile["crs"], profile["count"], profile["dtype"], res) != (
            first["crs"],
            first["count"],
            first["dtype"],
            (res_x, res_y),
        ):
            raise ValueError(f"{tile}: CRS, bands, data type or resolution differ from {infos[0][0]}")
    left = min(b.left for *_, b, _ in infos)
    top = max(b.top for *_, b, _ in infos)
    right = max(b.right for *_, b, _ in infos)
    bottom = min(b.bottom for *_, b, _ in infos)
    width, height = round((right - left) / res_x), round((top - bottom) / res_y)
    data_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}[first["dtype"]]
    lines = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f"  <SRS>{escape(first['crs'].to_wkt())}</SRS>",
        f"  <GeoTransform>{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {-res_y!r}</GeoTransform>",
    ]
    for band in range(1, first["count"] + 1):
        lines.append(f'  <VRTRasterBand dataType="{data_type}" band="{band}">')
        if first["nodata"] is not None:
            lines.append(f"    <NoDataValue>{first['nodata']!r}</NoDataValue>")
        for tile, profile, bounds, _ in infos:
            x_off, y_off = round((bounds.left - left) / res_x), round((top - bounds.top) / res_y)
            w, h = profile["width"], profile["height"]
            source = "ComplexSource" if first["nodata"] is not None else "SimpleSource"
            lines += [
                f"    <{source}>",
                f'      <SourceFilename relativeToVRT="0">{escape(str(tile))}</SourceFilename>',
                f"      <SourceBand>{band}</SourceBand>",
                f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}" />',
                f'      <DstRect xOff="{x_off}" yOff="{y_off}" xSize="{w}" ySize="{h}" />',
            ]
            if first["nodata"] is not None:
                lines.append(f"      <NODATA>{first['nodata']!r}</NODATA>")
            lines.append(f"    </{source}>")
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.write_text("\n".join(lines) + "\n")
    return path
