"""Chips/s of building a dataset from geodata (scripts/make_dataset.py's library), per worker process count.

A generated orthophoto scene (16-bit, 4 bands, as the reference imagery; ``--bands 2,3,4 --scale
fixed:0,65535``) with its sidewalk centerlines as OSM-style lines is cut into 256-px chips overlapping by 32
px; every chip is read window by window, scaled, its mask rasterised, both PNG-encoded and written to parquet.
The table gives chips/s, chips/s per worker core, and the peak resident memory of one worker process.

    .venv/bin/python bench/make_dataset_speed.py [--size-px 3072] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-px", type=int, default=3072, help="side of the generated scene")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker process counts")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    from sidewalk_hf.data.scene import write_scene
    from sidewalk_hf.datasets_from_geodata import BuildOptions, build_dataset

    root = Path(tempfile.mkdtemp(prefix="make_dataset_speed-"))
    try:
        started = time.time()
        scene = write_scene(root / "in", "tile", height_px=args.size_px, width_px=args.size_px, seed=0,
                            gsd_m=0.15, num_bands=4, dtype="uint16")  # fmt: skip
        collection = json.loads(scene.centerlines.read_text())
        for feature in collection["features"]:
            feature["properties"]["width"] = feature["properties"].pop("width_m")
        labels = root / "in" / "sidewalks.geojson"
        labels.write_text(json.dumps(collection))
        print(
            f"scene {args.size_px}x{args.size_px} px, 4 bands uint16, written in {time.time() - started:.1f} s"
        )
        rows = []
        for workers in args.workers:
            out = root / f"out{workers}"
            report = build_dataset(BuildOptions(images=[str(scene.image)], labels=[str(labels)], out=str(out),
                                                bands="2,3,4", scale="fixed:0,65535", num_workers=workers,
                                                chips_per_unit=64))  # fmt: skip
            chips = sum(c["chips"] for c in report["splits"].values())
            per_s = chips / report["work_seconds"]
            rows.append((workers, chips, report["work_seconds"], per_s, per_s / max(1, workers)))
            shutil.rmtree(out)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print("| workers | chips | seconds | chips/s | chips/s per core |")
        print("| --- | --- | --- | --- | --- |")
        for workers, chips, seconds, per_s, per_core in rows:
            print(f"| {workers} | {chips} | {seconds:.1f} | {per_s:.1f} | {per_core:.1f} |")
        print(f"peak RSS of a worker process: {peak_mb:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
