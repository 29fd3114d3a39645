"""Sidewalk masks (or probabilities) to sidewalk polygons and a centerline network (GeoJSON, WGS84).

python scripts/vectorize.py out/tile.mask.tif --out vectors/
python scripts/vectorize.py out/*.prob.tif --threshold 0.4 --out vectors/ --crs source --workers 4
python scripts/vectorize.py MASK --out DIR --config demo.yaml --opts VECTOR.GAP_LENGTH_M 8
python scripts/vectorize.py /shared/out/*.mask.tif --out /shared/vectors/ --engine ray   # a Ray cluster

With several rasters, a tile that fails is named (stderr, vectors.json) and the others and their merged
network are still written; the exit status is then 1.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sidewalk_hf.network.vectorize import VectorInputError, vectorize_run
from sidewalk_hf.training.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "rasters", nargs="+", help="mask GeoTIFFs (1 sidewalk, 255 nodata) or probability rasters"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--threshold",
        nargs="?",
        type=float,
        const=-1.0,
        default=None,
        help="the inputs are probabilities: sidewalk where p >= THRESHOLD (no value: VECTOR.THRESHOLD)",
    )
    parser.add_argument(
        "--crs",
        choices=("wgs84", "source"),
        default="wgs84",
        help="source: also write a GeoPackage in the rasters' CRS",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes over tiles (VECTOR.WORKERS)")
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default=None,
        help="local: this process or --workers processes; ray: a task per tile on a Ray cluster (VECTOR.ENGINE)",
    )
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster address (VECTOR.RAY_ADDRESS; default: local/auto)"
    )
    parser.add_argument("--config", default=None, help="a config name in configs/ or a path")
    parser.add_argument(
        "--opts", nargs="*", default=[], help="KEY VALUE overrides, e.g. VECTOR.SPUR_LENGTH_M 2"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.opts)
        threshold = cfg.VECTOR.THRESHOLD if args.threshold == -1.0 else args.threshold
        report = vectorize_run(
            args.rasters,
            args.out,
            cfg,
            threshold,
            crs_source=args.crs == "source",
            workers=args.workers,
            engine=args.engine,
            ray_address=args.ray_address,
        )
    except (ConfigError, VectorInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for tile in report["tiles"] + ([report["run"]] if report["run"] else []):
        if tile.get("status") == "failed":
            print(f"FAILED {tile['tile']} ({tile['raster']}): {tile['error']}", file=sys.stderr)
            continue
        print(
            f"{tile['tile']}: {tile['num_edges']} edges, {tile['length_m'] / 1000:.2f} km, "
            f"{tile['num_components']} components, {tile['num_joined']} joined, {tile['num_polygons']} polygons "
            f"-> {tile['centerlines']}"
        )
    print(json.dumps({"seconds": report["seconds"], "summary": str(Path(args.out) / "vectors.json")}))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
