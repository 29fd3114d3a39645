"""The dataset card of a geodata dataset, and reading its pixel rule back (for training and inference).

The card's YAML holds what ``datasets`` and the Hub read (``license``, ``task_categories``,
``size_categories``, ``configs``, ``dataset_info`` with features and splits) and, under ``pixel_rule``,
the band selection and scaling the chips were made with (``PixelRule.to_dict``), which a model trained on
the dataset records in its image processor so that inference reads rasters the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .writing import FEATURES, SplitCounts

CARD_FILE = "README.md"


def size_category(num_examples: int) -> str:
    """The Hub's ``size_categories`` bucket."""
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if num_examples < limit:
            return name
    return "10M<n<100M"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def render_card(report: dict) -> str:
    """Markdown card with YAML front matter from a finished build's report (see ``build.py``)."""
    options, rule = report["options"], report["pixel_rule"]
    splits = {name: SplitCounts.from_dict(c) for name, c in report["splits"].items() if c["chips"]}
    total = sum(c.chips for c in splits.values())
    description = (
        f"{options['chip_px']}-px chips cut from {report['rasters_used']} orthophoto raster(s) with sidewalk "
        f"masks rasterised from vectors; pixel rule: {report['pixel_rule_text']}."
    )
    metadata = {
        "license": options["license"],
        "pretty_name": options.get("pretty_name") or "Aerial sidewalk chips",
        "task_categories": ["image-segmentation"],
        "size_categories": [size_category(total)],
        "tags": ["aerial-imagery", "orthophoto", "sidewalks", "semantic-segmentation", "geospatial"],
        "pixel_rule": rule,
        "chip_size_px": options["chip_px"],
        "dataset_info": {
            "description": description,
            "features": FEATURES._to_yaml_list(),
            "splits": [
                {"name": n, "num_bytes": c.arrow_bytes, "num_examples": c.chips} for n, c in splits.items()
            ],
        },
        "configs": [
            {"config_name": "default", "data_files": [{"split": n, "path": f"data/{n}-*"} for n in splits]}
        ],
    }
    gsd = [c for c in splits.values() if c.chips]
    gsd_text = (
        f"{min(c.gsd_min_m for c in gsd):.3g}-{max(c.gsd_max_m for c in gsd):.3g} m per pixel"
        if gsd and min(c.gsd_min_m for c in gsd) != max(c.gsd_max_m for c in gsd)
        else (f"{gsd[0].gsd_min_m:.3g} m per pixel" if gsd else "-")
    )
    rows = "\n".join(
        f"| {name} | {c.chips} | {report['shards'].get(name, 0)} | {_share(c.sidewalk_px, c.pixels)} | "
        f"{_share(c.ignore_px, c.pixels)} |"
        for name, c in splits.items()
    )
    skipped = report["skipped_chips"]
    bad = report["bad_rasters"]
    bad_text = (
        "\n".join(f"- `{Path(path).name}`: {reason}" for path, reason in bad.items()) if bad else "None."
    )
    labels = "\n".join(f"  - `{Path(p).name}`" for p in options["labels"])
    line_width_text = f", else {options['line_width_m']:g} m" if options["line_width_m"] else ""
    split_text = (
        f"spatial blocks of {options['split_block_m']:g} m x {options['split_block_m']:g} m"
        if options["split_by"] == "block"
        else "whole rasters"
    )
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False)}---

# {metadata["pretty_name"]}

{description}

## Sources

- Imagery: {report["rasters_used"]} raster(s) ({report["rasters_total"]} given), ground resolution {gsd_text}.
- Labels: {options.get("label_source") or "the vector files listed here"}; license of the labels:
  **{report["label_license"]}**.{' OpenStreetMap-derived labels are under the ODbL 1.0 (share-alike: a database made from them is ODbL too; attribution "© OpenStreetMap contributors").' if report["label_license"] == "odbl" else ""}
{labels}
- Dataset license (chosen by its builder): `{options["license"]}`.

## How the chips were made

- Chips of {options["chip_px"]} x {options["chip_px"]} px overlapping by {options["overlap_px"]} px (the last chip of
  each row and column is flush with the raster's edge), read window by window.
- Pixels: {report["pixel_rule_text"]} (`pixel_rule` in this card's metadata; the same rule and code as
  `scripts/predict.py`). Images are {options["image_format"].upper()}, one band per selected raster band.
- Masks: 0 background, 1 sidewalk, 255 ignore. Lines are buffered by half their width
  (`{options["width_field"]}` in metres{line_width_text}; square caps, mitre joins) in a metric frame of each raster, polygons are used as they are; rasterised with
  `rasterio.features.rasterize(all_touched=False)`: a pixel is sidewalk when its centre is inside a sidewalk
  polygon. Pixels outside the annotated region ({"`" + Path(options["label_region"]).name + "`" if options["label_region"] else "the convex hull of each label file"})
  and nodata pixels are 255; chips that are all nodata or all outside the region are left out.
- Splits: {split_text}, seed {options["seed"]}, fractions {", ".join(f"{f:g}" for f in options["split"])};
  a chip touching blocks of different splits is left out, so no place is in two splits.

## Splits

| split | chips | parquet shards | sidewalk pixel share | ignore pixel share |
| --- | --- | --- | --- | --- |
{rows}

Left out: {skipped.get("nodata", 0)} all-nodata chips, {skipped.get("outside_region", 0)} chips outside the
annotated region, {skipped.get("split_boundary", 0)} chips across split blocks.

## Columns

`image`, `mask` (`datasets.Image()`); `crs` (EPSG code or WKT of the raster); `transform` (the chip's affine
a, b, c, d, e, f in that CRS); `source` (raster file name); `window` (col, row, width, height in the raster);
`gsd_m` (metres per pixel). `footprints/<split>.geojson` holds every chip's outline in WGS84 for a GIS.

## Rasters left out

{bad_text}

![chips and masks](contact_sheet.png)
"""


def read_card_metadata(source: str | os.PathLike) -> dict | None:
    """The YAML metadata of a dataset's card: a local folder in the Hub layout, or a Hub dataset id."""
    from huggingface_hub import DatasetCard, constants
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import HFValidationError

    path = Path(source)
    if path.is_dir():
        card_path = path / CARD_FILE
        return DatasetCard.load(card_path).data.to_dict() if card_path.is_file() else None
    if path.is_absolute() or path.parent.is_dir() and str(path.parent) != "." or constants.HF_HUB_OFFLINE:
        return None  # a local dataset not made yet (the synthetic one is generated at the start of training)
    try:
        return DatasetCard.load(str(source), repo_type="dataset").data.to_dict()
    except (EntryNotFoundError, OfflineModeIsEnabled, HFValidationError, HfHubHTTPError, OSError):
        return None


def pixel_rule_of_dataset(source: str | os.PathLike) -> dict | None:
    """The pixel rule (``PixelRule.to_dict``) a dataset's chips were made with, or None when it records none
    (the synthetic dataset, a dataset from elsewhere, a Hub dataset that cannot be reached)."""
    from ..geo.raster import PixelRule

    metadata = read_card_metadata(source)
    rule = (metadata or {}).get("pixel_rule")
    if not rule:
        return None
    try:
        return PixelRule.from_dict(rule).to_dict()
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{source}: the dataset card's pixel_rule {rule!r} is not valid: {error}") from None
