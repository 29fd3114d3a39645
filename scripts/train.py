"""Train a sidewalk segmentation model.

    accelerate launch scripts/train.py --config base.yaml
    accelerate launch scripts/train.py --resume runs/<run-name>
    accelerate launch scripts/train.py --config base.yaml --weights_path d2_cityscapes.pkl \\
        --batch_size 8 --opts SOLVER.BASE_LR 0.002 MODEL.LOSS.CLASS_WEIGHTS "[1.0, 5.0]"
"""

import sys
from pathlib import Path

# This folder holds scripts/evaluate.py, which would shadow the `evaluate` package: keep it off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sidewalk_hf.training.config import ConfigError
from sidewalk_hf.training.loop import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"config error: {error}")
