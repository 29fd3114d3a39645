"""The per-raster work of large-area inference, the same in every engine (one process, N processes, Ray).

A *part* is a band of output rows of one input raster (a whole raster unless several processes share one
large raster). For a part, DataLoader workers read its windows (``geo.raster.read_window``: band selection,
scaling, nodata), grouped in batches that run across window rows; the main thread runs the model and adds
each window's logits, times a smooth weight, into an accumulator one window tall; rows that no later window
touches are turned into classes (and probabilities) and handed to a writer thread, which writes them into a
tiled GeoTIFF and finally publishes it as a COG. Memory is bounded by the window height times the raster
width, whatever the raster's size. The model never waits on writing, nor on reading when there are reading
workers (the default on a GPU; on a CPU a worker would take a core from the model, so the main thread reads).

Determinism: a batch is a fixed slice of the part's windows, worker k produces the batches with
``index % num_workers == k`` and the DataLoader hands them over in index order, and logits are accumulated
in window order; so outputs do not depend on the number of workers, and (on a CPU in fp32, where a sample's
result does not depend on the rest of its batch) not on the batch size either. A part that starts below the
raster's top recomputes the window rows above it that reach into it, in the same order, so that splitting a
raster between processes gives the same pixels as running it whole.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from affine import Affine

from ..geo.raster import PixelRule, RasterInputError, open_raster, read_window
from .outputs import DEFLATE_LEVEL, classes_and_probability, open_strip_writer, publish_cog, temporary_path
from .windows import WindowGrid, blend_weights

logger = logging.getLogger(__name__)


@dataclass
class InferenceOptions:
    """Everything that changes the pixels of an output (recorded in the manifest)."""

    window_px: int = 256
    stride_fraction: float = 0.75
    blend: str = "cosine"
    batch_size: int = 8
    num_workers: int = -1  # -1: none on a CPU, min(4, half the cores) on a GPU
    dtype: str = "fp32"
    write_probs: bool = False
    rule: PixelRule = field(default_factory=PixelRule)

    def manifest(self) -> dict:
        data = asdict(self)
        data["rule"] = self.rule.to_dict()
        return data


@dataclass(frozen=True)
class Part:
    """Output rows ``[y0, y1)`` of input ``path`` (the whole raster when ``index_in_input`` is the only part)."""

    path: str
    stem: str
    y0: int
    y1: int
    index_in_input: int
    parts_in_input: int

    @property
    def key(self) -> str:
        return self.stem if self.parts_in_input == 1 else f"{self.stem}#{self.index_in_input}"


@dataclass
class RasterPlan:
    """What the main process learns from an input's header before any pixel is read."""

    path: str
    stem: str
    height: int
    width: int
    profile: dict
    warnings: list[str]


def plan_raster(path: str, rule: PixelRule, num_channels: int) -> RasterPlan:
    """Open the header and check it against the rule and the model; errors name the file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_raster(path) as src:
            indexes = rule.band_indexes(src)
            if len(indexes) != num_channels:
                raise RasterInputError(
                    f"{path}: {len(indexes)} band(s) selected ({indexes}) but the model takes {num_channels}; "
                    f"choose {num_channels} with --bands (the raster has {src.count})"
                )
            notes = []
            if src.crs is None:
                notes.append("the raster has no CRS: outputs have none either")
            if src.transform.is_identity:
                notes.append("the raster has no geotransform: outputs are in pixel coordinates")
            profile = {"width": src.width, "height": src.height, "crs": src.crs, "transform": src.transform}
            plan = RasterPlan(str(path), Path(path).stem, src.height, src.width, profile, notes)
    plan.warnings += [str(w.message) for w in caught if "NotGeoreferenced" not in type(w.message).__name__]
    for note in plan.warnings:
        logger.warning("%s: %s", path, note)
    return plan


def split_into_parts(plan: RasterPlan, grid: WindowGrid, num_parts: int) -> list[Part]:
    bands = grid.band_rows(num_parts)
    return [Part(plan.path, plan.stem, y0, y1, i, len(bands)) for i, (y0, y1) in enumerate(bands)]


class _PartWindows(torch.utils.data.IterableDataset):
    """The batches of windows of one part; worker k yields batch indexes ``k, k + n, ...``."""

    def __init__(self, part: Part, grid: WindowGrid, rule: PixelRule, batch_size: int):
        self.part, self.grid, self.rule, self.batch_size = part, grid, rule, batch_size
        r0, r1 = grid.rows_for_output_band(part.y0, part.y1)
        per_row = len(grid.col_starts)
        self.first, self.last = r0 * per_row, r1 * per_row
        self.num_batches = -(-(self.last - self.first) // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        src = None
        try:
            src = open_raster(self.part.path)
            for batch in range(worker, self.num_batches, num_workers):
                start = self.first + batch * self.batch_size
                indexes = range(start, min(start + self.batch_size, self.last))
                try:
                    pixels, valid = self._read_batch(src, indexes)
                    yield {
                        "batch": batch,
                        "indexes": torch.tensor(list(indexes)),
                        "pixels": torch.from_numpy(pixels),
                        "valid": torch.from_numpy(valid),
                        "error": "",
                    }
                except Exception as error:  # noqa: BLE001 - a bad block fails this part, named, not the run
                    yield {"batch": batch, "error": f"{type(error).__name__}: {error}"}
        except Exception as error:  # noqa: BLE001
            for batch in range(worker, self.num_batches, num_workers):
                yield {"batch": batch, "error": f"{type(error).__name__}: {error}"}
        finally:
            if src is not None:
                src.close()

    def _read_batch(self, src, indexes: range) -> tuple[np.ndarray, np.ndarray]:
        """The batch's windows, read with one call per window row it spans (the span of its windows there).

        Reading, scaling and masking are per pixel, so cutting the windows out of their row's span gives the
        same chips as reading each window, for one rasterio call instead of one per window and without
        reading the overlaps twice; a span is at most a batch of windows wide, so memory stays bounded.
        """
        from rasterio.windows import Window

        h, w = self.grid.window_shape
        per_row = len(self.grid.col_starts)
        row_starts, col_starts = self.grid.row_starts, self.grid.col_starts
        pixels, valid = [], []
        for row, in_row in itertools.groupby(indexes, key=lambda index: index // per_row):
            cols = [index % per_row for index in in_row]
            x_from = col_starts[cols[0]]
            span = col_starts[cols[-1]] + w - x_from
            chips, ok = read_window(src, Window(x_from, row_starts[row], span, h), self.rule)
            for col in cols:
                x0 = col_starts[col] - x_from
                pixels.append(chips[:, :, x0 : x0 + w])
                valid.append(ok[:, x0 : x0 + w])
        return np.stack(pixels), np.stack(valid)


class _Writer:
    """One background thread that runs write calls in order; a bounded queue keeps memory bounded."""

    def __init__(self, max_pending: int = 8):
        self.tasks: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="raster-writer")
        self.thread.start()

    def _run(self):
        while True:
            task = self.tasks.get()
            if task is None:
                return
            fn, args = task
            if self.error is None:
                try:
                    fn(*args)
                except BaseException as error:  # noqa: BLE001 - reported by the caller, naming the part
                    self.error = error

    def submit(self, fn, *args):
        self.tasks.put((fn, args))

    def close(self):
        self.tasks.put(None)
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class _Accumulator:
    """Blended logits of the window row being run, one window tall and the raster wide."""

    def __init__(self, grid: WindowGrid, num_labels: int, top: int, blend: str):
        h, _ = grid.window_shape
        self.grid, self.top, self.h = grid, top, h
        self.logits = np.zeros((num_labels, h, grid.width), np.float32)
        self.weights = np.zeros((h, grid.width), np.float32)
        self.valid = np.zeros((h, grid.width), bool)
        self.weight = blend_weights(grid.window_shape, blend)

    def weigh(self, logits: np.ndarray) -> np.ndarray:
        """A batch's ``(B, labels, h, w)`` logits times the blend weight, in one pass, C-ordered for ``add``."""
        weighted = np.empty(logits.shape, np.float32)
        return np.multiply(logits, self.weight, out=weighted)

    def add(self, y0: int, x0: int, weighted_logits: np.ndarray | None, valid: np.ndarray) -> None:
        h, w = self.grid.window_shape
        rows = slice(y0 - self.top, y0 - self.top + h)
        self.valid[rows, x0 : x0 + w] |= valid
        if weighted_logits is not None:
            self.logits[:, rows, x0 : x0 + w] += weighted_logits
            self.weights[rows, x0 : x0 + w] += self.weight

    def take_rows(
        self, until: int, sidewalk_label: int, with_probability: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Classes (and probability) of the finished rows ``[top, until)``, and shift the rest up."""
        n = until - self.top
        out = classes_and_probability(
            self.logits[:, :n], self.weights[:n], self.valid[:n], sidewalk_label, with_probability
        )
        for array in (self.logits, self.weights, self.valid):
            array[..., : self.h - n, :] = array[..., n:, :]
            array[..., self.h - n :, :] = 0
        self.top = until
        return out


def predict_part(
    model,
    part: Part,
    plan: RasterPlan,
    options: InferenceOptions,
    out_dir: Path,
    *,
    progress=None,
) -> dict:
    """Run one part and write its outputs; returns its manifest entry (raises nothing for a bad raster)."""
    started = time.perf_counter()
    grid = WindowGrid.for_raster(plan.height, plan.width, options.window_px, options.stride_fraction)
    dataset = _PartWindows(part, grid, options.rule, options.batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=max(0, min(options.num_workers, len(dataset))),
        pin_memory=model.device.type == "cuda",
        persistent_workers=False,
    )
    whole = part.parts_in_input == 1
    final = {"mask": out_dir / f"{part.stem}.mask.tif"}
    if options.write_probs:
        final["prob"] = out_dir / f"{part.stem}.prob.tif"
    strips = {
        kind: (
            temporary_path(path, "strip")
            if whole
            else out_dir / f".{part.stem}.part{part.index_in_input}.{kind}.tif"
        )
        for kind, path in final.items()
    }
    tags = {
        "SIDEWALK_MODEL": model.source,
        "SIDEWALK_PIXEL_RULE": options.rule.describe(),
        "SIDEWALK_WINDOW_PX": options.window_px,
        "SIDEWALK_STRIDE": options.stride_fraction,
    }
    band_transform = plan.profile["transform"] @ Affine.translation(0, part.y0)
    writer = _Writer()
    dsts = {}
    entry = {
        "part": part.key,
        "path": part.path,
        "y0": part.y0,
        "y1": part.y1,
        "windows_run": 0,
        "windows_nodata": 0,
    }
    try:
        for kind, path in strips.items():
            tag = {
                "mask": "0 background, 1 sidewalk, 255 nodata",
                "prob": "sidewalk probability x 254, 255 nodata",
            }
            dsts[kind] = open_strip_writer(
                path,
                plan.profile,
                part.y1 - part.y0,
                band_transform,
                tags | {"VALUES": tag[kind]},
                num_threads=torch.get_num_threads(),
            )
        r0, _ = grid.rows_for_output_band(part.y0, part.y1)
        acc = _Accumulator(grid, model.num_labels, grid.row_starts[r0], options.blend)

        def write_rows(y_from: int, classes: np.ndarray, probability: np.ndarray | None) -> None:
            from rasterio.windows import Window

            lo, hi = max(y_from, part.y0), min(y_from + len(classes), part.y1)
            if hi <= lo:
                return
            window = Window(0, lo - part.y0, plan.width, hi - lo)
            dsts["mask"].write(classes[lo - y_from : hi - y_from][None], window=window)
            if "prob" in dsts:
                dsts["prob"].write(probability[lo - y_from : hi - y_from][None], window=window)

        def flush(until: int) -> None:
            if until <= acc.top:
                return
            y_from = acc.top
            classes, probability = acc.take_rows(until, model.sidewalk_label, "prob" in dsts)
            writer.submit(write_rows, y_from, classes, probability)

        current_row = r0
        for batch in loader:
            if batch["error"]:
                raise RasterInputError(
                    f"{part.path}: reading batch {batch['batch']} failed: {batch['error']}"
                )
            valid = batch["valid"].numpy()
            runnable = valid.reshape(len(valid), -1).any(axis=1)
            logits = None
            if runnable.any():
                pixels = batch["pixels"] if runnable.all() else batch["pixels"][torch.from_numpy(runnable)]
                logits = acc.weigh(model.logits(pixels).numpy())
            k = 0
            for i, index in enumerate(batch["indexes"].tolist()):
                row, _, y0, x0 = grid.window(index)
                if row != current_row:
                    flush(grid.row_starts[row])
                    current_row = row
                if runnable[i]:
                    acc.add(y0, x0, logits[k], valid[i])
                    k += 1
                else:
                    acc.add(y0, x0, None, valid[i])
            entry["windows_run"] += int(runnable.sum())
            entry["windows_nodata"] += int((~runnable).sum())
            if progress is not None:
                progress.update(len(runnable))
        flush(min(acc.top + acc.h, plan.height))
        writer.close()
        writer = None
        for dst in dsts.values():
            dst.close()
        outputs = {}
        if whole:
            for kind, path in final.items():
                outputs[kind] = {
                    "path": path.name,
                    "sha256": publish_cog(
                        strips[kind], path, torch.get_num_threads(), deflate_level=DEFLATE_LEVEL[kind]
                    ),
                }
        else:
            outputs = {kind: {"strip": path.name} for kind, path in strips.items()}
        entry.update(status="ok", outputs=outputs)
    except Exception as error:  # noqa: BLE001 - every failure is recorded with its text; the run goes on
        logger.error("%s failed: %s", part.key, error)
        entry.update(
            status="failed",
            error=f"{type(error).__name__}: {error}"
            if not isinstance(error, RasterInputError)
            else str(error),
        )
    finally:
        if writer is not None:
            try:
                writer.close()
            except Exception as late:  # noqa: BLE001 - the first error is the one reported
                logger.debug("%s: writer error after the first failure: %s", part.key, late)
        for dst in dsts.values():
            if not dst.closed:
                dst.close()
        if whole or entry.get("status") != "ok":
            for path in strips.values():
                path.unlink(missing_ok=True)
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry


def assemble_parts(
    stem: str, plan: RasterPlan, part_entries: list[dict], out_dir: Path, kinds: list[str]
) -> dict:
    """Join the row-band strips of one raster (in row order) into its COG outputs."""
    import rasterio
    from rasterio.windows import Window

    outputs = {}
    entries = sorted(part_entries, key=lambda e: e["y0"])
    for kind in kinds:
        final = out_dir / f"{stem}.{kind}.tif"
        joined = temporary_path(final, "join")
        try:
            with rasterio.open(out_dir / entries[0]["outputs"][kind]["strip"]) as first:
                tags = first.tags()
            dst = open_strip_writer(
                joined,
                plan.profile,
                plan.height,
                plan.profile["transform"],
                tags,
                num_threads=torch.get_num_threads(),
            )
            with dst:
                for entry in entries:
                    with rasterio.open(out_dir / entry["outputs"][kind]["strip"]) as strip:
                        for _, window in strip.block_windows(1):
                            data = strip.read(1, window=window)
                            dst.write(
                                data[None],
                                window=Window(
                                    window.col_off, window.row_off + entry["y0"], window.width, window.height
                                ),
                            )
            outputs[kind] = {
                "path": final.name,
                "sha256": publish_cog(
                    joined, final, torch.get_num_threads(), deflate_level=DEFLATE_LEVEL[kind]
                ),
            }
        finally:
            joined.unlink(missing_ok=True)
    for entry in entries:
        for kind in kinds:
            (out_dir / entry["outputs"][kind]["strip"]).unlink(missing_ok=True)
    return outputs
