"""Predict sidewalk masks over rasters, in their own CRS and grid.

python scripts/predict.py --model runs/<run> --input tiles/ --out out/ [--bands 4,2,3] [--scale percentiles:2,98]
accelerate launch --num_processes 8 scripts/predict.py --model org/sidewalk-deeplab --input mosaic.vrt --out out/
python scripts/predict.py --engine ray --model org/sidewalk-deeplab --input /shared/tiles/ --out /shared/out/
"""

import sys
from pathlib import Path

# This folder holds scripts/evaluate.py, which would shadow the `evaluate` package: keep it off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sidewalk_hf.inference.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
