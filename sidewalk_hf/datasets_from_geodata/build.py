"""Building a dataset from orthophotos and sidewalk vectors: plan, parallel units of work, resume, finish.

A build reads the labels once, inspects every raster (a raster that cannot be opened, has no CRS, lacks
the selected bands, cannot be scaled by the rule, or does not overlap the annotated region is reported and
left out; the build goes on), resolves the pixel rule once (percentiles from a sample of every raster),
and cuts each raster into units of a few hundred chips (rows of chips). Worker processes run the units:
each reads its chips window by window, rasterises their masks, and writes its own parquet parts row group
by row group into ``OUT/.build/units/`` (memory: one raster window, one row group per split, the labels
near the unit). A unit is done when its folder is renamed into place, so ``resume=True`` after an
interruption runs only the units that are not. When all units have run, the parts become the shards of
``OUT/data/``, with ``footprints/``, the card, ``contact_sheet.png`` and ``build_report.json``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..geo.raster import PixelRule, RasterInputError, expand_inputs, open_raster, read_window
from .card import CARD_FILE, render_card
from .chips import ChipGrid
from .labels import IGNORE, LabelInputError, RasterLabels, hull_region, read_label_layer, read_region_layer
from .splits import SPLITS, SplitPlan, parse_split_fractions
from .writing import (
    IMAGE_FORMATS,
    PartWriter,
    SplitCounts,
    contact_sheet,
    encode_image,
    encode_mask,
    first_chips,
    write_footprints,
    write_shards,
)

logger = logging.getLogger(__name__)
BUILD_DIR = ".build"
REPORT_FILE = "build_report.json"
# What a build writes into its folder; --overwrite removes a folder holding nothing else.
DATASET_ENTRIES = frozenset({BUILD_DIR, "data", "footprints", CARD_FILE, "contact_sheet.png", REPORT_FILE})
GDAL_CACHE_MB = 128  # per worker process: GDAL's default (5% of RAM) times many workers would not be bounded


class BuildError(ValueError):
    """A build that cannot start or finish; the message names the option, file or folder."""


@dataclass
class BuildOptions:
    """Everything that decides a dataset's contents (``DATASET_BUILD`` in the config; flags of the CLI)."""

    images: list[str]
    labels: list[str]
    out: str
    chip_px: int = 256
    overlap_px: int = 32
    bands: str | None = None
    scale: str = "none"
    image_format: str = "png"
    width_field: str = "width"
    line_width_m: float | None = None
    labels_where: str = ""
    label_region: str = ""
    split: tuple[float, ...] = (0.8, 0.1, 0.1)
    split_by: str = "block"
    split_block_m: float = 500.0
    seed: int = 0
    license: str = "other"
    label_source: str = ""
    label_license: str = ""
    pretty_name: str = ""
    num_workers: int = 4
    chips_per_unit: int = 512

    def __post_init__(self):
        if not self.images:
            raise BuildError("no --images given")
        if not self.labels:
            raise BuildError("no --labels given")
        if not self.out:
            raise BuildError("no --out folder given")
        if self.image_format not in IMAGE_FORMATS:
            raise BuildError(f"--image-format {self.image_format!r}: valid values are {list(IMAGE_FORMATS)}")
        try:
            self.split = parse_split_fractions(self.split)
            ChipGrid(self.chip_px, self.chip_px, self.chip_px, self.overlap_px)
        except ValueError as error:
            raise BuildError(str(error)) from None
        if self.num_workers < 0:
            raise BuildError(f"--num-workers must be >= 0 (0: in this process), got {self.num_workers}")

    def content_dict(self) -> dict:
        """The options that decide the contents (not where or how fast): compared on resume."""
        data = asdict(self)
        for key in ("out", "num_workers"):
            data.pop(key)
        data["split"] = list(data["split"])
        return data


@dataclass
class _Context:
    """What every unit of work needs, given once to each worker process."""

    layers: list
    region_layers: list
    rule: PixelRule
    split_plan: SplitPlan
    chip_px: int
    overlap_px: int
    image_format: str
    units_dir: Path
    rasters: dict = field(default_factory=dict)  # raster path -> inspection info


_CONTEXT: _Context | None = None


def _set_context(context: _Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def _chip_outline(window, transform) -> tuple[np.ndarray, np.ndarray]:
    """Corners and edge midpoints of a window, in the raster's CRS."""
    cols = np.array([0, 0.5, 1, 1, 1, 0.5, 0, 0]) * window.width
    rows = np.array([0, 0, 0, 0.5, 1, 1, 1, 0.5]) * window.height
    xs, ys = transform @ (cols, rows)
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def run_unit(unit: dict) -> dict:
    """Cut, label and write one unit (chip rows ``[r0, r1)`` of a raster); returns its counts or its error."""
    import rasterio
    from pyproj import Transformer
    from rasterio.errors import RasterioError
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    from ..geo.units import CRSUnitError

    context = _CONTEXT
    info = context.rasters[unit["raster"]]
    folder = context.units_dir / unit["id"]
    staging = context.units_dir / f"{unit['id']}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    writer = PartWriter(staging)
    skipped: Counter = Counter()
    name = Path(unit["raster"]).name
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), open_raster(unit["raster"]) as src:
            grid = ChipGrid(src.height, src.width, context.chip_px, context.overlap_px)
            starts = grid.row_starts[unit["r0"] : unit["r1"]]
            top, bottom = starts[0], min(src.height, starts[-1] + context.chip_px)
            area = window_bounds(Window(0, top, src.width, bottom - top), src.transform)
            labels = RasterLabels.for_area(
                context.layers, context.region_layers, src.crs, src.transform, src.width, src.height, area
            )
            splitter = context.split_plan.for_raster(name, src.crs)
            to_wgs84 = Transformer.from_crs(src.crs.to_wkt(), "EPSG:4326", always_xy=True)
            crs_text = src.crs.to_string()
            for window in grid.windows(unit["r0"], unit["r1"]):
                chip_transform = src.window_transform(window)
                xs, ys = _chip_outline(window, chip_transform)
                split = splitter.split_of_chip(xs, ys)
                if split is None:
                    skipped["split_boundary"] += 1
                    continue
                pixels, valid = read_window(src, window, context.rule)
                if not valid.any():
                    skipped["nodata"] += 1
                    continue
                shape = (int(window.height), int(window.width))
                mask = labels.chip_mask(chip_transform, shape)
                mask[~valid] = IGNORE
                if (mask == IGNORE).all():
                    skipped["outside_region"] += 1
                    continue
                col, row = int(window.col_off), int(window.row_off)
                cell = f"{Path(name).stem}_c{col}_r{row}"
                record = {
                    "image": {
                        "bytes": encode_image(pixels, context.image_format),
                        "path": f"{cell}.{'jpg' if context.image_format == 'jpeg' else 'png'}",
                    },
                    "mask": {"bytes": encode_mask(mask), "path": f"{cell}.mask.png"},
                    "crs": crs_text,
                    "transform": list(tuple(chip_transform)[:6]),
                    "source": name,
                    "window": [col, row, shape[1], shape[0]],
                    "gsd_m": info["gsd_m"],
                }
                lon, lat = to_wgs84.transform(xs[[0, 2, 4, 6, 0]], ys[[0, 2, 4, 6, 0]])
                outline = [[round(float(a), 9), round(float(b), 9)] for a, b in zip(lon, lat)]
                properties = {
                    "source": name,
                    "window": record["window"],
                    "split": split,
                    "gsd_m": info["gsd_m"],
                }
                writer.add(split, record, mask, outline, properties)
        counts = writer.close()
    except (RasterInputError, RasterioError, CRSUnitError, OSError, ValueError) as error:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        return {"id": unit["id"], "raster": unit["raster"], "status": "failed", "error": f"{error}"}
    result = {
        "id": unit["id"],
        "raster": unit["raster"],
        "status": "done",
        "splits": counts,
        "skipped": dict(skipped),
        "peak_rss_mib": _peak_rss_mib(),
    }
    (staging / "done.json").write_text(json.dumps(result) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return result


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux and macOS; 0 where unknown)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError):
        return 0.0


def _fingerprint(path: str | Path) -> list:
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _inspect_raster(path: Path, rule: PixelRule, region_layers, options: BuildOptions) -> dict:
    """Header facts of a raster, or ``{"error": reason}`` for one that cannot be used."""
    import numpy as np
    from rasterio.errors import RasterioError

    from ..geo.units import CRSUnitError, metric_frame

    try:
        with open_raster(path) as src:
            if src.crs is None:
                return {"error": "no CRS: the raster is not georeferenced (a GeoTIFF without its CRS?)"}
            indexes = rule.band_indexes(src)
            dtype = src.dtypes[indexes[0] - 1]
            if rule.kind == "none" and np.dtype(dtype) != np.uint8:
                return {
                    "error": f"data type {dtype}: give a scaling rule (--scale fixed:LO,HI or percentiles:P,Q)"
                }
            frame = metric_frame(src.crs, src.transform, src.width, src.height)
            region = RasterLabels.for_area(
                [], region_layers, src.crs, src.transform, src.width, src.height, tuple(src.bounds)
            )
            if not region.has_labelled_area:
                return {"error": "no overlap with the labels' annotated region"}
            chip_m = options.chip_px * frame.pixel_size_m
            if options.split_by == "block" and options.split_block_m < 2 * chip_m:
                raise BuildError(
                    f"--split-block-m {options.split_block_m:g} is less than twice a chip's side on {path.name} "
                    f"({chip_m:.1f} m): most chips would straddle blocks; use at least {2 * chip_m:.0f}"
                )
            return {
                "crs_wkt": src.crs.to_wkt(),
                "transform": list(tuple(src.transform)[:6]),
                "width": src.width,
                "height": src.height,
                "bands": len(indexes),
                "gsd_m": round(float(frame.pixel_size_m), 6),
                "metric_crs_wkt": frame.metric_crs.to_wkt(),
                "unit_m": frame.unit_m,
            }
    except (RasterInputError, RasterioError, CRSUnitError, OSError) as error:
        return {"error": str(error)}


def _resolve_rule(rule: PixelRule, paths: list[str]) -> PixelRule:
    if rule.kind != "percentiles":
        return rule

    def datasets():
        for path in paths:
            with open_raster(path) as src:
                yield src

    return rule.resolve(datasets())


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Returns whether an unfinished build is resumed."""
    plan_path = out / BUILD_DIR / "plan.json"
    if overwrite and out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DATASET_ENTRIES)
        if foreign:
            raise BuildError(f"{out} holds files a build does not write ({foreign[:5]}): not removing it")
        shutil.rmtree(out)
    if plan_path.is_file():
        if not resume:
            raise BuildError(f"{out} holds an unfinished build: pass --resume to finish it or --overwrite")
        return True
    if out.exists() and any(out.iterdir()):
        what = "a finished dataset" if (out / CARD_FILE).is_file() else "other files"
        raise BuildError(f"{out} already holds {what}; choose another --out or pass --overwrite")
    return False


def build_dataset(options: BuildOptions, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Build the dataset of ``options`` into ``options.out``; returns the build report (also written there)."""
    started = time.time()
    out = Path(options.out)
    resuming = _prepare_out_dir(out, resume, overwrite)
    build_dir = out / BUILD_DIR
    units_dir = build_dir / "units"

    try:
        layers = [
            read_label_layer(
                p,
                width_field=options.width_field,
                line_width_m=options.line_width_m,
                where=options.labels_where or None,
            )
            for p in options.labels
        ]
        region_layers = (
            [read_region_layer(options.label_region)]
            if options.label_region
            else [hull_region(layer) for layer in layers]
        )
        rule = PixelRule.parse(options.bands, options.scale)
        paths = expand_inputs(options.images)
    except (LabelInputError, RasterInputError) as error:
        raise BuildError(str(error)) from None

    fingerprints = {
        "rasters": [_fingerprint(p) for p in paths],
        "labels": [_fingerprint(p) for p in options.labels]
        + ([_fingerprint(options.label_region)] if options.label_region else []),
    }
    plan_path = build_dir / "plan.json"
    if resuming:
        plan = json.loads(plan_path.read_text())
        differing = sorted(k for k, v in options.content_dict().items() if plan["options"].get(k) != v)
        if plan["fingerprints"] != fingerprints:
            differing.append("input files (changed, added or removed since the build started)")
        if differing:
            raise BuildError(f"{out}: --resume with other inputs than the unfinished build: {differing}")
        rule = PixelRule.from_dict(plan["pixel_rule"])
        rasters, bad = plan["rasters"], plan["bad_rasters"]
        split_plan = SplitPlan(**{**plan["split_plan"], "fractions": tuple(plan["split_plan"]["fractions"])})
        logger.info("resuming the build in %s", out)
    else:
        rasters, bad = {}, {}
        for path in paths:
            info = _inspect_raster(path, rule, region_layers, options)
            if "error" in info:
                bad[str(path)] = info["error"]
                logger.warning("left out %s: %s", path, info["error"])
            elif rasters and info["bands"] != next(iter(rasters.values()))["bands"]:
                first = next(iter(rasters.values()))["bands"]
                bad[str(path)] = (
                    f"gives {info['bands']} bands, the dataset's first raster {first} (see --bands)"
                )
                logger.warning("left out %s: %s", path, bad[str(path)])
            else:
                rasters[str(path)] = info
        if not rasters:
            raise BuildError(
                f"no usable raster among {len(paths)}: "
                + "; ".join(f"{Path(p).name}: {r}" for p, r in bad.items())
            )
        try:
            rule = _resolve_rule(rule, list(rasters))
        except RasterInputError as error:
            raise BuildError(str(error)) from None
        first = next(iter(rasters.values()))
        split_plan = SplitPlan(
            fractions=tuple(options.split),
            seed=options.seed,
            by=options.split_by,
            block_m=options.split_block_m,
            frame_crs_wkt=first["metric_crs_wkt"],
            frame_unit_m=first["unit_m"],
        )
        build_dir.mkdir(parents=True, exist_ok=True)
        plan = {
            "options": options.content_dict(),
            "fingerprints": fingerprints,
            "pixel_rule": rule.to_dict(),
            "rasters": rasters,
            "bad_rasters": bad,
            "split_plan": {**asdict(split_plan), "fractions": list(split_plan.fractions)},
        }
        tmp = plan_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=1) + "\n")
        tmp.rename(plan_path)

    units = []
    for raster_index, (path, info) in enumerate(rasters.items()):
        grid = ChipGrid(info["height"], info["width"], options.chip_px, options.overlap_px)
        for r0, r1 in grid.row_bands(options.chips_per_unit):
            units.append(
                {
                    "id": f"{raster_index:05d}-{r0:05d}",
                    "raster": path,
                    "r0": r0,
                    "r1": r1,
                    "chips": (r1 - r0) * len(grid.col_starts),
                }
            )
    context = _Context(
        layers,
        region_layers,
        rule,
        split_plan,
        options.chip_px,
        options.overlap_px,
        options.image_format,
        units_dir,
        rasters,
    )
    units_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for unit in units:
        done = units_dir / unit["id"] / "done.json"
        if done.is_file():
            results[unit["id"]] = json.loads(done.read_text())
    pending = [u for u in units if u["id"] not in results]
    logger.info(
        "%d rasters (%d left out), %d units of work (%d already done), %d chip positions; %s",
        len(rasters),
        len(bad),
        len(units),
        len(results),
        sum(u["chips"] for u in units),
        rule.describe(),
    )
    work_started = time.time()
    for result in _run_units(pending, context, options.num_workers):
        results[result["id"]] = result
        if result["status"] == "failed":
            logger.warning("unit %s of %s failed: %s", result["id"], result["raster"], result["error"])
    work_seconds = time.time() - work_started
    label_license = options.label_license or (
        "odbl" if any(layer.looks_like_osm for layer in layers) else "unknown"
    )
    return _finish(out, options, plan, units, results, started, work_seconds, len(pending), label_license)


def _run_units(pending: list[dict], context: _Context, num_workers: int):
    """Results of ``run_unit`` as units finish: in this process (0 workers) or in worker processes, with a
    bounded number of units in flight."""
    if num_workers == 0 or len(pending) <= 1:
        _set_context(context)
        for unit in pending:
            yield run_unit(unit)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    workers = min(num_workers, len(pending))
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=_set_context, initargs=(context,)
    ) as pool:
        queue = list(reversed(pending))
        in_flight = set()
        while queue or in_flight:
            while queue and len(in_flight) < 2 * workers:
                in_flight.add(pool.submit(run_unit, queue.pop()))
            finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()


def _finish(
    out: Path, options: BuildOptions, plan: dict, units, results, started, work_seconds, ran, label_license
) -> dict:
    build_dir = out / BUILD_DIR
    final = build_dir / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    done = [u for u in units if results.get(u["id"], {}).get("status") == "done"]
    failed = {u["id"]: results[u["id"]] for u in units if results.get(u["id"], {}).get("status") == "failed"}
    bad = dict(plan["bad_rasters"])
    for result in failed.values():
        previous = bad.get(result["raster"])
        bad[result["raster"]] = (
            previous + "; " if previous else ""
        ) + f"unit {result['id']}: {result['error']}"
    splits = {name: SplitCounts() for name in SPLITS}
    skipped: Counter = Counter()
    for unit in done:
        result = results[unit["id"]]
        for name, counts in result["splits"].items():
            splits[name].add(SplitCounts.from_dict(counts))
        skipped.update(result["skipped"])
    total = sum(c.chips for c in splits.values())
    if total == 0:
        raise BuildError(f"no chip was made: {dict(skipped)} left out; rasters left out: {bad}")
    folders = [build_dir / "units" / u["id"] for u in done]
    shards = write_shards(folders, final)
    footprints = write_footprints(folders, final)
    if label_license == "odbl" and options.license != "odbl":
        logger.warning(
            "the labels look OpenStreetMap-derived (ODbL, share-alike) but --license is %r", options.license
        )
    chips_made = sum(c.chips for c in splits.values())
    report = {
        "options": {**options.content_dict(), "num_workers": options.num_workers},
        "pixel_rule": plan["pixel_rule"],
        "pixel_rule_text": PixelRule.from_dict(plan["pixel_rule"]).describe(),
        "label_license": label_license,
        "rasters_total": len(plan["rasters"]) + len(plan["bad_rasters"]),
        "rasters_used": len({u["raster"] for u in done}),
        "bad_rasters": bad,
        "splits": {name: c.to_dict() for name, c in splits.items()},
        "shards": shards,
        "footprints": footprints,
        "skipped_chips": dict(skipped),
        "units": {"total": len(units), "ran_now": ran, "failed": len(failed)},
        "peak_rss_mib": max(results[u["id"]].get("peak_rss_mib", 0.0) for u in done),
        "seconds": round(time.time() - started, 2),
        "work_seconds": round(work_seconds, 2),
        "chips_per_s": round(chips_made / work_seconds, 2)
        if ran == len(units) and work_seconds > 0
        else None,
    }
    shown_splits = [name for name in SPLITS if splits[name].chips]
    contact_sheet(first_chips(final, shown_splits, 6), final / "contact_sheet.png")
    (final / CARD_FILE).write_text(render_card(report))
    (final / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    for entry in final.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        entry.rename(target)
    shutil.rmtree(build_dir)
    return report
