"""Reading a user's rasters as the model sees them: band selection, scaling to 8 bits, nodata.

One implementation, used both when chips are cut for a training dataset and when a trained model runs over
rasters, so that training and inference see identical pixels. The rule is data (``PixelRule.to_dict``):
it is recorded in a dataset's card and ``dataset_info``, in the image processor of a model trained on it,
in the inference manifest and in the tags of every output raster.

- Bands are 1-based indexes in rasterio's convention (``--bands 4,2,3`` is NIR, G, B of a B, G, R, NIR
  raster). By default every band that is not an alpha band is used, in file order.
- Scaling: ``none`` (the data must already be uint8; it passes through unchanged), ``fixed:LO,HI`` (one
  range for every band) or ``fixed:LO,HI;LO,HI;...`` (one per selected band), or ``percentiles:P,Q``
  (per band, from a sample of every valid pixel of the run's rasters, computed once with
  ``PixelRule.resolve`` and then fixed). A value x becomes ``clip(round((x - LO) / (HI - LO) * 255), 0,
  255)``; so uint16 data that is ``uint8 x 257`` scaled with ``fixed:0,65535`` gives the uint8 values back.
- Nodata: a pixel is invalid where GDAL's dataset mask says so (the nodata value, an internal mask, or an
  alpha band). Invalid pixels are 0 in the returned chip and False in the returned validity mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCALE_KINDS = ("none", "fixed", "percentiles")
PERCENTILE_SAMPLE_PX = 1024  # the longer side of the decimated read each raster contributes to percentiles


class RasterInputError(ValueError):
    """A raster or a band/scale rule that cannot be used; the message names the file or the option."""


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"4,2,3"`` -> ``(4, 2, 3)``; ``None`` or ``""`` -> every non-alpha band."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (list, tuple)):
        items = [str(item) for item in text]
    else:
        items = [item.strip() for item in str(text).split(",")]
    try:
        bands = tuple(int(item) for item in items)
    except ValueError:
        raise RasterInputError(
            f"--bands {text!r}: expected 1-based band numbers separated by commas, e.g. 4,2,3"
        )
    if any(band < 1 for band in bands):
        raise RasterInputError(f"--bands {text!r}: band numbers start at 1 (rasterio's convention)")
    return bands


@dataclass(frozen=True)
class PixelRule:
    """Which bands, in which order, and how their values become uint8."""

    bands: tuple[int, ...] | None = None
    scale: str = "none"
    # Filled by ``resolve`` (or parsed from ``fixed:``): one (low, high) per selected band.
    ranges: tuple[tuple[float, float], ...] | None = field(default=None, compare=True)

    def __post_init__(self):
        kind = self.kind
        if kind not in SCALE_KINDS:
            raise RasterInputError(
                f"--scale {self.scale!r}: the rule must be one of none, fixed:LO,HI[;LO,HI...], percentiles:P,Q"
            )
        if kind == "fixed" and self.ranges is None:
            object.__setattr__(self, "ranges", _parse_ranges(self.scale))
        if kind == "percentiles":
            low, high = self.percentiles
            if not 0 <= low < high <= 100:
                raise RasterInputError(f"--scale {self.scale!r}: percentiles need 0 <= P < Q <= 100")

    @classmethod
    def parse(cls, bands: str | None, scale: str | None) -> PixelRule:
        return cls(bands=parse_bands(bands), scale=(scale or "none").strip())

    @property
    def kind(self) -> str:
        return self.scale.split(":", 1)[0].strip()

    @property
    def percentiles(self) -> tuple[float, float]:
        try:
            low, high = (float(item) for item in self.scale.split(":", 1)[1].split(","))
        except (IndexError, ValueError):
            raise RasterInputError(f"--scale {self.scale!r}: expected percentiles:P,Q, e.g. percentiles:2,98")
        return low, high

    def to_dict(self) -> dict:
        return {
            "bands": list(self.bands) if self.bands else None,
            "scale": self.scale,
            "ranges": [list(pair) for pair in self.ranges] if self.ranges else None,
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> PixelRule:
        if not data:
            return cls()
        ranges = data.get("ranges")
        return cls(
            bands=tuple(data["bands"]) if data.get("bands") else None,
            scale=data.get("scale") or "none",
            ranges=tuple(tuple(float(v) for v in pair) for pair in ranges) if ranges else None,
        )

    def describe(self) -> str:
        """One line for cards, logs and raster tags."""
        bands = ",".join(map(str, self.bands)) if self.bands else "all (no alpha)"
        text = f"bands {bands}; scale {self.scale}"
        if self.ranges and self.kind == "percentiles":
            text += " = fixed:" + ";".join(f"{lo:g},{hi:g}" for lo, hi in self.ranges)
        return text

    def band_indexes(self, dataset) -> list[int]:
        """The 1-based bands to read from ``dataset``, checked against what it has."""
        if self.bands is None:
            from rasterio.enums import ColorInterp

            return [i + 1 for i, ci in enumerate(dataset.colorinterp) if ci != ColorInterp.alpha] or [1]
        wrong = [band for band in self.bands if band > dataset.count]
        if wrong:
            raise RasterInputError(
                f"{dataset.name}: --bands {','.join(map(str, self.bands))} asks for band(s) {wrong}, "
                f"but the raster has {dataset.count} band(s)"
            )
        return list(self.bands)

    def resolve(self, datasets) -> PixelRule:
        """A rule with fixed ranges: percentiles are computed from a decimated read of every raster."""
        if self.kind != "percentiles" or self.ranges is not None:
            return self
        low_q, high_q = self.percentiles
        samples: list[list[np.ndarray]] = []
        for dataset in datasets:
            indexes = self.band_indexes(dataset)
            factor = max(1, int(np.ceil(max(dataset.width, dataset.height) / PERCENTILE_SAMPLE_PX)))
            shape = (max(1, dataset.height // factor), max(1, dataset.width // factor))
            data = dataset.read(indexes, out_shape=(len(indexes), *shape), resampling=_nearest())
            valid = dataset.dataset_mask(out_shape=shape, resampling=_nearest()) > 0
            if not samples:
                samples = [[] for _ in indexes]
            if len(indexes) != len(samples):
                raise RasterInputError(
                    f"{dataset.name}: {len(indexes)} bands selected, other rasters have {len(samples)}"
                )
            for band, values in zip(samples, data):
                band.append(values[valid].astype(np.float64))
        ranges = []
        for band in samples:
            values = np.concatenate(band) if band else np.zeros(0)
            if values.size == 0:
                raise RasterInputError(f"--scale {self.scale}: no valid pixel to compute percentiles from")
            low, high = np.percentile(values, [low_q, high_q])
            ranges.append((float(low), float(high) if high > low else float(low) + 1.0))
        return PixelRule(bands=self.bands, scale=self.scale, ranges=tuple(ranges))

    def to_uint8(self, data: np.ndarray, dtype: str, name: str = "raster") -> np.ndarray:
        """(C, H, W) source values -> uint8 by this rule."""
        if self.kind == "none":
            if np.dtype(dtype) != np.uint8:
                raise RasterInputError(
                    f"{name}: the data type is {dtype}; the model takes 8-bit values, so give a scaling rule, "
                    "e.g. --scale percentiles:2,98 or --scale fixed:0,65535"
                )
            return data.astype(np.uint8, copy=False)
        if self.ranges is None:
            raise RasterInputError(f"--scale {self.scale}: resolve() the percentiles before reading")
        ranges = self.ranges if len(self.ranges) > 1 else self.ranges * len(data)
        if len(ranges) != len(data):
            raise RasterInputError(
                f"--scale {self.scale}: {len(ranges)} ranges for {len(data)} selected bands"
            )
        low = np.array([lo for lo, _ in ranges], np.float64)[:, None, None]
        span = np.array([hi - lo for lo, hi in ranges], np.float64)[:, None, None]
        scaled = np.rint((data.astype(np.float64) - low) / span * 255.0)
        return np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).astype(np.uint8)


def _parse_ranges(scale: str) -> tuple[tuple[float, float], ...]:
    try:
        body = scale.split(":", 1)[1]
        ranges = tuple(tuple(float(v) for v in pair.split(",")) for pair in body.split(";"))
    except (IndexError, ValueError):
        raise RasterInputError(
            f"--scale {scale!r}: expected fixed:LO,HI or fixed:LO,HI;LO,HI;... (one per band)"
        )
    if any(len(pair) != 2 or pair[1] <= pair[0] for pair in ranges):
        raise RasterInputError(f"--scale {scale!r}: each range is LO,HI with HI > LO")
    return ranges


def _nearest():
    from rasterio.enums import Resampling

    return Resampling.nearest


def open_raster(path: str | os.PathLike):
    """``rasterio.open`` with an error that names the file and says what was expected."""
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(path)
    except RasterioIOError as error:
        raise RasterInputError(
            f"{path}: cannot be opened as a raster (GeoTIFF, COG, VRT, ...): {error}"
        ) from None


def read_window(dataset, window, rule: PixelRule) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8 (C, H, W), valid bool (H, W))`` of ``window``; invalid pixels are 0."""
    from rasterio.enums import MaskFlags

    indexes = rule.band_indexes(dataset)
    data = dataset.read(indexes, window=window)
    pixels = rule.to_uint8(data, dataset.dtypes[indexes[0] - 1], name=dataset.name)
    if all(flags == [MaskFlags.all_valid] for flags in dataset.mask_flag_enums):
        # no nodata value, internal mask or alpha band: GDAL would compute an all-255 mask, a tenth of the read
        return pixels, np.ones(pixels.shape[1:], bool)
    valid = dataset.dataset_mask(window=window) > 0
    pixels[:, ~valid] = 0
    return pixels, valid


def expand_inputs(
    items: list[str | os.PathLike], suffixes=(".tif", ".tiff", ".vrt", ".jp2", ".img")
) -> list[Path]:
    """Files, folders (their rasters, sorted) and glob patterns -> a sorted list of unique raster paths."""
    import glob

    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(glob.glob(str(item)))
            if not matches:
                raise RasterInputError(f"{item}: no such file, folder or pattern")
            found += [Path(m) for m in matches]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise RasterInputError(
            f"no raster found in {[str(i) for i in items]} (looked for {', '.join(suffixes)})"
        )
    return unique
