"""Training datasets from geodata: orthophoto rasters + sidewalk vectors -> a streamed Hugging Face dataset.

``build_dataset(BuildOptions(...))`` writes chips and masks in the Hub parquet layout that
``SegmentationStream`` and ``datasets.load_dataset(..., streaming=True)`` read, with per-chip georeference
columns, chip footprints, a dataset card and a contact sheet; ``push_dataset_to_hub`` publishes it;
``pixel_rule_of_dataset`` reads back the band/scaling rule a dataset was made with (training records it
in the image processor). ``scripts/make_dataset.py`` is the command line.

Names are imported on first use, so that training (which reads a dataset's pixel rule) does not need the
``geo`` extra (rasterio, shapely, pyproj, pyogrio) that building a dataset needs.
"""

import importlib

_EXPORTS = {
    "BuildError": "build",
    "BuildOptions": "build",
    "build_dataset": "build",
    "run_unit": "build",
    "pixel_rule_of_dataset": "card",
    "read_card_metadata": "card",
    "render_card": "card",
    "ChipGrid": "chips",
    "chip_starts": "chips",
    "push_dataset_to_hub": "hub",
    "LabelInputError": "labels",
    "LabelLayer": "labels",
    "RasterLabels": "labels",
    "parse_width_m": "labels",
    "read_label_layer": "labels",
    "SPLITS": "splits",
    "SplitPlan": "splits",
    "parse_split_fractions": "splits",
    "FEATURES": "writing",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
