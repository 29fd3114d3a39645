"""Build a training dataset from orthophoto rasters and sidewalk vectors, in the Hub parquet layout.

python scripts/make_dataset.py --images rasters/ --labels sidewalks.geojson --out data/nj \
    [--bands 4,2,3 --scale percentiles:2,98] [--split 0.8,0.1,0.1 --split-block-m 500] [--push-to-hub org/nj-sidewalks]
"""

import sys
from pathlib import Path

# This folder holds scripts/evaluate.py, which would shadow the `evaluate` package: keep it off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sidewalk_hf.datasets_from_geodata.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
