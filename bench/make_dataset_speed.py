"""Chips/s of building a dataset from geodata (scripts/make_dataset.py's library), per worker process count.

A generated orthophoto scene (16-bit, 4 bands, as the reference imagery; ``--bands 2,3,4 --scale
fixed:0,65535``) with its sidewalk centerlines as OSM-style lines is cut into 256-px chips overlapping by 32
px; every chip is read window by window, scaled, its mask rasterised, both PNG-encoded and written to parquet.
The table gives chips/s, chips/s per worker core, and the peak resident memory of a worker process (forked
workers count the main process' pages they map, so compare it with the main process' figure printed below).

    .venv/bin/python bench/make_dataset_speed.py [--size-px 3072] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
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

    from sidewalk_hf.datasets_from_geodata import BuildOptions, build_dataset

    root = Path(tempfile.mkdtemp(prefix="make_dataset_speed-"))
    try:
        started = time.time()
        # The scene is rendered in another process, so that this one (whose pages forked workers share) stays
        # as small as a make_dataset run.
        script = (
            "import json, sys; from sidewalk_hf.data.scene import write_scene; "
            "s = write_scene(sys.argv[1], 'tile', height_px=int(sys.argv[2]), width_px=int(sys.argv[2]), seed=0, "
            "gsd_m=0.15, num_bands=4, dtype='uint16'); c = json.loads(s.centerlines.read_text()); "
            "[f['properties'].__setitem__('width', f['properties'].pop('width_m')) for f in c['features']]; "
            "open(sys.argv[1] + '/sidewalks.geojson', 'w').write(json.dumps(c))"
        )
        subprocess.run([sys.executable, "-c", script, str(root / "in"), str(args.size_px)], check=True)
        image, labels = root / "in" / "tile.tif", root / "in" / "sidewalks.geojson"
        print(
            f"scene {args.size_px}x{args.size_px} px, 4 bands uint16, written in {time.time() - started:.1f} s"
        )
        parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = []
        for workers in args.workers:
            out = root / f"out{workers}"
            report = build_dataset(
                BuildOptions(
                    images=[str(image)],
                    labels=[str(labels)],
                    out=str(out),
                    bands="2,3,4",
                    scale="fixed:0,65535",
                    num_workers=workers,
                    chips_per_unit=64,
                )
            )
            chips = sum(c["chips"] for c in report["splits"].values())
            per_s = chips / report["work_seconds"]
            rows.append(
                (
                    workers,
                    chips,
                    report["work_seconds"],
                    per_s,
                    per_s / max(1, workers),
                    report["peak_rss_mib"],
                )
            )
            shutil.rmtree(out)
        print("| workers | chips | seconds | chips/s | chips/s per core | peak RSS of a worker (MiB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for workers, chips, seconds, per_s, per_core, rss in rows:
            print(f"| {workers} | {chips} | {seconds:.1f} | {per_s:.1f} | {per_core:.1f} | {rss:.0f} |")
        print(
            f"main process before the builds: {parent_mb:.0f} MiB peak RSS (forked workers start with its pages)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
