"""The vector stage's speed and memory per 5000 x 5000 tile on one core, and over tiles in parallel.

    python bench/vector_stage.py                      # all cases, tables + bench/results/vector_stage.json
    python bench/vector_stage.py --size 2500          # smaller tiles, a quick look

Cases (each in a fresh process, one thread, so that its peak RSS is its own):

- ``realistic``: a synthetic scene's true mask (0.25 m pixels) as a model paints it: sidewalks dilated by
  one pixel, 0.1 % salt noise, 300 bumps, 40 gaps cut across sidewalks, 2 % of sidewalk pixels dropped;
- ``speckles``: 150,000 isolated 3 x 3 speckles (removed by cleaning: 0.56 m2 < 4 m2);
- ``speckles-kept``: the same with ``MIN_OBJECT_AREA_M2 0``, so 150,000 tiny skeletons reach the graph;
- ``tiles-N-workers``: the realistic tile cut into 2 x 2 tiles, vectorised as one run (halos read across
  tile borders through a VRT, one merged network), in 1 and in N processes.

Peak RSS is the process's maximum resident set (``ru_maxrss``), imports included; ``base_rss_mb`` is the
same process after its imports, before the tile, so the stage's own memory is the difference;
``worker_peak_rss_mb`` is the largest worker process's (the tiles cases with workers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def make_inputs(work: Path, size: int) -> dict:
    """The masks of every case (cached in ``work``)."""
    import numpy as np
    import rasterio
    from scipy import ndimage

    from sidewalk_hf.data.scene import split_into_tiles, write_scene

    work.mkdir(parents=True, exist_ok=True)
    realistic = work / f"realistic_{size}.mask.tif"
    speckles = work / f"speckles_{size}.mask.tif"
    if not realistic.exists():
        scene = write_scene(work, f"scene_{size}", height_px=size, width_px=size, seed=42, gsd_m=0.25)
        with rasterio.open(scene.truth_mask) as src:
            truth, profile = src.read(1) == 1, src.profile
        rng = np.random.default_rng(0)
        mask = ndimage.binary_dilation(truth)
        mask |= rng.random(mask.shape) < 0.001
        outline = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        yy, xx = np.mgrid[-9:10, -9:10]
        for y, x in outline[rng.choice(len(outline), 300, replace=False)]:
            disc = (yy**2 + xx**2) <= rng.uniform(3, 8) ** 2
            ys, xs = np.clip(yy[disc] + y, 0, size - 1), np.clip(xx[disc] + x, 0, size - 1)
            mask[ys, xs] = True
        for y, x in np.argwhere(truth)[rng.choice(int(truth.sum()), 40, replace=False)]:
            mask[max(0, y - 5) : y + 5, max(0, x - 5) : x + 5] = False
        mask &= ~((rng.random(mask.shape) < 0.02) & truth)
        with rasterio.open(realistic, "w", **(profile | {"nodata": 255})) as dst:
            dst.write(mask.astype(np.uint8)[None])
        split_into_tiles(realistic, 2, 2, work / f"tiles_{size}")
    if not speckles.exists():
        mask = np.zeros((size, size), np.uint8)
        rows, cols = size // 12, size // 12
        count = min(150_000, rows * cols)
        cells = np.arange(rows * cols)[:count]
        for dy in range(3):
            for dx in range(3):
                mask[(cells // cols) * 12 + 4 + dy, (cells % cols) * 12 + 4 + dx] = 1
        with rasterio.open(realistic) as src:
            profile = src.profile
        with rasterio.open(speckles, "w", **profile) as dst:
            dst.write(mask[None])
    tiles = sorted((work / f"tiles_{size}").glob("*.tif"))
    return {"realistic": realistic, "speckles": speckles, "tiles": tiles}


def run_case(case: str, work: Path, size: int, workers: int) -> dict:
    """One case in this process (called in a fresh subprocess)."""
    from sidewalk_hf.network.vectorize import vectorize_raster, vectorize_run

    inputs = make_inputs(work, size)
    base = _rss_mb()
    out = work / f"out_{case}"
    started = time.perf_counter()
    if case == "realistic":
        summary = vectorize_raster(inputs["realistic"], out, None)
    elif case == "speckles":
        summary = vectorize_raster(inputs["speckles"], out, None)
    elif case == "speckles-kept":
        summary = vectorize_raster(inputs["speckles"], out, {"MIN_OBJECT_AREA_M2": 0.0})
    elif case.startswith("tiles"):
        summary = vectorize_run(inputs["tiles"], out, None, workers=workers)["run"]
    else:
        raise SystemExit(f"unknown case {case!r}")
    seconds = time.perf_counter() - started
    return {
        "case": case,
        "size_px": size,
        "workers": workers,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "base_rss_mb": round(base, 1),
        "worker_peak_rss_mb": round(_rss_mb(resource.RUSAGE_CHILDREN), 1) or None,
        "num_edges": summary["num_edges"],
        "num_components": summary["num_components"],
        "length_km": round(summary["length_m"] / 1000, 2),
        "num_polygons": summary["num_polygons"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=5000, help="tile side in pixels")
    parser.add_argument("--work", default="/tmp/sidewalk_vector_bench", help="cache of generated masks")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--cases", nargs="+", default=["realistic", "speckles", "speckles-kept", "tiles"])
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args()
    work = Path(args.work)
    if args.case == "prepare":
        make_inputs(work, args.size)
        return
    if args.case:
        print(json.dumps(run_case(args.case, work, args.size, args.workers)))
        return

    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    prepare = [sys.executable, __file__, "--case", "prepare", "--size", str(args.size), "--work", str(work)]
    subprocess.run(prepare, env=env, check=True, cwd=ROOT)
    runs = []
    for case in args.cases:
        for workers in [1, args.workers] if case == "tiles" else [1]:
            name = f"tiles-{workers}-workers" if case == "tiles" else case
            command = [
                sys.executable,
                __file__,
                "--case",
                name,
                "--size",
                str(args.size),
                "--work",
                str(work),
                "--workers",
                str(workers),
            ]
            done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    print(
        f"\n{'case':<18} {'px':>6} {'s':>7} {'peak RSS MB':>12} {'base MB':>8} {'worker MB':>10} "
        f"{'edges':>7} {'km':>7} {'polys':>6}"
    )
    for r in runs:
        worker = f"{r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] else "-"
        print(
            f"{r['case']:<18} {r['size_px']:>6} {r['seconds']:>7.2f} {r['peak_rss_mb']:>12.0f} {r['base_rss_mb']:>8.0f} "
            f"{worker:>10} {r['num_edges']:>7} {r['length_km']:>7.2f} {r['num_polygons']:>6}"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "vector_stage.json").write_text(
        json.dumps({"cpu_count": os.cpu_count(), "runs": runs}, indent=2)
    )


if __name__ == "__main__":
    main()
