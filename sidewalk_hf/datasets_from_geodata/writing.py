"""Writing a geodata dataset in the Hub layout: parquet parts as chips are cut, then shards, footprints.

Each unit of work writes its own parts (one parquet file and one footprints file per split) into a staging
folder, row group by row group, so memory stays at one row group per split and a finished unit survives
an interruption. ``write_shards`` turns the parts into ``data/<split>-XXXXX-of-YYYYY.parquet`` (a part is
hard-linked when large enough, small ones are concatenated row group by row group) and
``write_footprints`` into ``footprints/<split>.geojson`` (WGS84 chip outlines, for QGIS).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from ..data.synthetic import IGNORE, JPEG_QUALITY, ROWS_PER_ROW_GROUP, SIDEWALK
from .splits import SPLITS

FEATURES = Features(
    {
        "image": Image(),
        "mask": Image(),
        "crs": Value("string"),
        "transform": List(Value("float64"), length=6),
        "source": Value("string"),
        "window": List(Value("int32"), length=4),
        "gsd_m": Value("float32"),
    }
)
IMAGE_FORMATS = ("png", "jpeg")
TARGET_SHARD_BYTES = 256 * 2**20  # small parts are merged up to this size; larger ones stay as they are


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """(C, H, W) uint8 -> PNG (lossless, 1-4 bands) or JPEG (1 or 3 bands) bytes."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    if image_format == "jpeg":
        if pixels.shape[0] not in (1, 3):
            raise ValueError(f"JPEG chips need 1 or 3 bands, the rule selects {pixels.shape[0]}; use png")
        PILImage.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        PILImage.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class SplitCounts:
    """What one split holds; added up over units."""

    chips: int = 0
    pixels: int = 0
    sidewalk_px: int = 0
    ignore_px: int = 0
    arrow_bytes: int = 0
    gsd_min_m: float = float("inf")
    gsd_max_m: float = 0.0

    def add(self, other: SplitCounts) -> None:
        self.chips += other.chips
        self.pixels += other.pixels
        self.sidewalk_px += other.sidewalk_px
        self.ignore_px += other.ignore_px
        self.arrow_bytes += other.arrow_bytes
        self.gsd_min_m = min(self.gsd_min_m, other.gsd_min_m)
        self.gsd_max_m = max(self.gsd_max_m, other.gsd_max_m)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.chips == 0:
            data["gsd_min_m"] = data["gsd_max_m"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SplitCounts:
        data = dict(data)
        data["gsd_min_m"] = float("inf") if data.get("gsd_min_m") is None else data["gsd_min_m"]
        data["gsd_max_m"] = data.get("gsd_max_m") or 0.0
        return cls(**data)


@dataclass
class PartWriter:
    """The parquet and footprint parts of one unit of work, one per split, written as chips come."""

    folder: Path
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)
    _writers: dict = field(default_factory=dict)
    _footprints: dict = field(default_factory=dict)

    def add(self, split: str, row: dict, mask: np.ndarray, footprint_lonlat: list, properties: dict) -> None:
        counts = self.counts.setdefault(split, SplitCounts())
        counts.chips += 1
        counts.pixels += mask.size
        counts.sidewalk_px += int((mask == SIDEWALK).sum())
        counts.ignore_px += int((mask == IGNORE).sum())
        counts.gsd_min_m = min(counts.gsd_min_m, row["gsd_m"])
        counts.gsd_max_m = max(counts.gsd_max_m, row["gsd_m"])
        self._rows.setdefault(split, []).append(row)
        feature = {
            "type": "Feature",
            "properties": properties,
            "geometry": {"type": "Polygon", "coordinates": [footprint_lonlat]},
        }
        self._footprints.setdefault(split, []).append(json.dumps(feature))
        if len(self._rows[split]) >= ROWS_PER_ROW_GROUP:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._rows.pop(split, [])
        if not rows:
            return
        schema = FEATURES.arrow_schema
        if split not in self._writers:
            self._writers[split] = pq.ParquetWriter(self.folder / f"{split}.parquet", schema)
        table = pa.Table.from_pylist(rows, schema=schema)
        self._writers[split].write_table(table)
        self.counts[split].arrow_bytes += table.nbytes

    def close(self) -> dict[str, dict]:
        for split in list(self._rows):
            self._flush(split)
        for writer in self._writers.values():
            writer.close()
        for split, lines in self._footprints.items():
            (self.folder / f"{split}.footprints.jsonl").write_text("\n".join(lines) + "\n")
        return {split: counts.to_dict() for split, counts in self.counts.items()}

    def abort(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(OSError, ValueError):  # already failing: the folder is discarded
                writer.close()


def write_shards(part_folders: list[Path], out_dir: Path) -> dict[str, int]:
    """``data/<split>-XXXXX-of-YYYYY.parquet`` from the units' parts, in unit order; returns shards per split."""
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    shards_per_split = {}
    for split in SPLITS:
        parts = [
            folder / f"{split}.parquet" for folder in part_folders if (folder / f"{split}.parquet").is_file()
        ]
        if not parts:
            continue
        groups: list[list[Path]] = [[]]
        size = 0
        for part in parts:
            part_size = part.stat().st_size
            if groups[-1] and size + part_size > TARGET_SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(part)
            size += part_size
        for index, group in enumerate(groups):
            path = data_dir / f"{split}-{index:05d}-of-{len(groups):05d}.parquet"
            if len(group) == 1:
                _link_or_copy(group[0], path)
                continue
            with pq.ParquetWriter(path, FEATURES.arrow_schema) as writer:
                for part in group:
                    parquet = pq.ParquetFile(part)
                    for row_group in range(parquet.num_row_groups):
                        writer.write_table(parquet.read_row_group(row_group))
        shards_per_split[split] = len(groups)
    return shards_per_split


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def write_footprints(part_folders: list[Path], out_dir: Path) -> list[str]:
    """``footprints/<split>.geojson``: every chip's outline in WGS84, with its source, window and split."""
    folder = out_dir / "footprints"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split in SPLITS:
        parts = [
            f / f"{split}.footprints.jsonl"
            for f in part_folders
            if (f / f"{split}.footprints.jsonl").is_file()
        ]
        if not parts:
            continue
        path = folder / f"{split}.geojson"
        with path.open("w") as out:
            out.write(json.dumps({"type": "FeatureCollection", "name": split})[:-1] + ', "features": [\n')
            first = True
            for part in parts:
                with part.open() as lines:
                    for line in lines:
                        if line.strip():
                            out.write(("" if first else ",\n") + line.strip())
                            first = False
            out.write("\n]}\n")
        written.append(f"footprints/{split}.geojson")
    return written


def first_chips(out_dir: Path, splits: list[str], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``count`` full-size chips (image HWC, mask HW) from the written shards, for the contact sheet."""
    found = []
    for split in splits:
        for path in sorted((out_dir / "data").glob(f"{split}-*.parquet")):
            parquet = pq.ParquetFile(path)
            for row_group in range(parquet.num_row_groups):
                table = parquet.read_row_group(row_group, columns=["image", "mask"])
                for image, mask in zip(table.column("image").to_pylist(), table.column("mask").to_pylist()):
                    pixels = np.array(PILImage.open(io.BytesIO(image["bytes"])))
                    labels = np.array(PILImage.open(io.BytesIO(mask["bytes"])))
                    if found and pixels.shape[:2] != found[0][0].shape[:2]:
                        continue
                    found.append((pixels, labels))
                    if len(found) >= count:
                        return found
                break  # one row group per shard is plenty
    return found


def contact_sheet(chips: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """The synthetic dataset's contact sheet (chip | mask) for chips of any band count."""
    from ..data.synthetic import Chip, _contact_sheet

    shown = []
    for pixels, mask in chips:
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        elif pixels.shape[2] == 2:
            pixels = np.repeat(pixels[..., :1], 3, axis=2)
        shown.append(
            Chip(
                image=np.ascontiguousarray(pixels[..., :3]),
                mask=mask,
                centerlines=[],
                sidewalk_px=0,
                hidden_sidewalk_px=0,
            )
        )
    _contact_sheet(shown, path)
