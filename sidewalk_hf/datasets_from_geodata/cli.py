"""Command line of ``scripts/make_dataset.py``: flags for the common options, ``DATASET_BUILD:`` for all."""

from __future__ import annotations

import argparse
import json
import logging
import sys

# Dedicated flags and the config key each one sets.
FLAG_KEYS = {
    "images": "DATASET_BUILD.IMAGES",
    "labels": "DATASET_BUILD.LABELS",
    "out": "DATASET_BUILD.OUT",
    "chip_size": "DATASET_BUILD.CHIP_SIZE_PX",
    "overlap": "DATASET_BUILD.OVERLAP_PX",
    "bands": "DATASET_BUILD.BANDS",
    "scale": "DATASET_BUILD.SCALE",
    "image_format": "DATASET_BUILD.IMAGE_FORMAT",
    "width_field": "DATASET_BUILD.WIDTH_FIELD",
    "line_width_m": "DATASET_BUILD.LINE_WIDTH_M",
    "where": "DATASET_BUILD.LABELS_WHERE",
    "label_region": "DATASET_BUILD.LABEL_REGION",
    "split": "DATASET_BUILD.SPLIT",
    "split_by": "DATASET_BUILD.SPLIT_BY",
    "split_block_m": "DATASET_BUILD.SPLIT_BLOCK_M",
    "seed": "DATASET_BUILD.SEED",
    "license": "DATASET_BUILD.LICENSE",
    "label_source": "DATASET_BUILD.LABEL_SOURCE",
    "label_license": "DATASET_BUILD.LABEL_LICENSE",
    "num_workers": "DATASET_BUILD.NUM_WORKERS",
    "push_to_hub": "DATASET_BUILD.PUSH_TO_HUB",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build a training dataset (Hub parquet layout) from orthophoto rasters and sidewalk vectors.",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--images", nargs="+", metavar="PATH", help="rasters (GeoTIFF, COG, VRT), folders or globs")
    add("--labels", nargs="+", metavar="VECTORS", help="sidewalk lines or polygons (GeoJSON, GPKG, SHP)")
    add("--out", help="output folder (the dataset)")
    add("--config", help="YAML config (its DATASET_BUILD: section): a path or a name in configs/")
    add("--chip-size", dest="chip_size", type=int, help="chip side in px (default 256)")
    add("--overlap", type=int, help="overlap of neighbouring chips in px (default 32)")
    add("--bands", help="1-based bands in model order, e.g. 4,2,3 (default: every non-alpha band)")
    add("--scale", help="none | fixed:LO,HI[;LO,HI...] | percentiles:P,Q (default none: uint8 rasters)")
    add("--image-format", dest="image_format", choices=["png", "jpeg"], help="chip encoding (default png)")
    add("--width-field", dest="width_field", help="line width attribute in metres (default width)")
    add("--line-width-m", dest="line_width_m", type=float, help="width of lines without a width attribute")
    add("--where", help="OGR SQL filter of the label features, e.g. \"footway = 'sidewalk'\"")
    add("--label-region", dest="label_region", help="polygons of the annotated area (default: labels' hull)")
    add("--split", help="train,validation,test fractions (default 0.8,0.1,0.1)")
    add("--split-by", dest="split_by", choices=["block", "raster"], help="spatial blocks or whole rasters")
    add("--split-block-m", dest="split_block_m", type=float, help="side of the split blocks in metres (500)")
    add("--seed", type=int, help="seed of the block-to-split draw (default 0)")
    add("--license", help="Hub license id of the dataset (e.g. odbl, cc-by-4.0; default other)")
    add("--label-source", dest="label_source", help="where the labels come from, for the card")
    add("--label-license", dest="label_license", help="license of the labels (default: odbl if OSM-like)")
    add("--num-workers", dest="num_workers", type=int, help="worker processes (0: this process; default 4)")
    add("--push-to-hub", dest="push_to_hub", metavar="ORG/NAME", help="publish the dataset when built")
    add("--public", action="store_true", help="create the Hub repository as public (default private)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="finish an interrupted build in --out")
    start.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    add("--opts", nargs="+", default=[], metavar="KEY VALUE", help="override any config key")
    return parser


def options_from_config(section) -> BuildOptions:  # noqa: F821 (imported lazily)
    """``BuildOptions`` from a ``DATASET_BUILD`` config section."""
    from .build import BuildOptions

    return BuildOptions(
        images=list(section.IMAGES),
        labels=list(section.LABELS),
        out=section.OUT,
        chip_px=section.CHIP_SIZE_PX,
        overlap_px=section.OVERLAP_PX,
        bands=section.BANDS or None,
        scale=section.SCALE or "none",
        image_format=section.IMAGE_FORMAT,
        width_field=section.WIDTH_FIELD,
        line_width_m=section.LINE_WIDTH_M,
        labels_where=section.LABELS_WHERE,
        label_region=section.LABEL_REGION,
        split=tuple(section.SPLIT),
        split_by=section.SPLIT_BY,
        split_block_m=section.SPLIT_BLOCK_M,
        seed=section.SEED,
        license=section.LICENSE,
        label_source=section.LABEL_SOURCE,
        label_license=section.LABEL_LICENSE,
        pretty_name=section.PRETTY_NAME,
        num_workers=section.NUM_WORKERS,
    )


def main(argv: list[str] | None = None) -> int:
    from ..training.config import ConfigError, load_config
    from .build import BuildError, build_dataset
    from .hub import push_dataset_to_hub

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    overrides = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag in ("images", "labels"):
            value = json.dumps([str(v) for v in value])
        elif flag == "split":
            value = "[" + value + "]"
        elif isinstance(value, str):
            value = json.dumps(value)  # a YAML string whatever it holds (":", ",", quotes)
        overrides += [key, str(value)]
    if args.public:
        overrides += ["DATASET_BUILD.PRIVATE", "false"]
    try:
        cfg = load_config(args.config, list(args.opts) + overrides)
        options = options_from_config(cfg.DATASET_BUILD)
        report = build_dataset(options, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, BuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_summary(report, options.out)
    if cfg.DATASET_BUILD.PUSH_TO_HUB:
        url = push_dataset_to_hub(
            options.out, cfg.DATASET_BUILD.PUSH_TO_HUB, private=cfg.DATASET_BUILD.PRIVATE
        )
        print(f"published {options.out} to {url}")
    return 1 if report["bad_rasters"] else 0


def _print_summary(report: dict, out: str) -> None:
    counts = ", ".join(f"{name} {c['chips']}" for name, c in report["splits"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped_chips"].items())) or "none"
    speed = f", {report['chips_per_s']} chips/s" if report.get("chips_per_s") else ""
    print(f"chips per split: {counts}; left out: {skipped}; {report['work_seconds']} s{speed}")
    print(
        f"rasters: {report['rasters_used']} used of {report['rasters_total']}; pixel rule: {report['pixel_rule_text']}"
    )
    for path, reason in report["bad_rasters"].items():
        print(f"LEFT OUT {path}: {reason}", file=sys.stderr)
    print(f"dataset: {out} (card README.md, footprints/, build_report.json)")
