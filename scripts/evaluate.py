"""Evaluate a model on a dataset split: the four metrics, per-class accuracy, confusion matrix, overlays.

python scripts/evaluate.py --model runs/<run> --dataset data/synthetic --split test
accelerate launch scripts/evaluate.py --model org/sidewalk-deeplab --dataset org/chips --split validation
"""

import sys
from pathlib import Path

# This folder holds scripts/evaluate.py, which would shadow the `evaluate` package: keep it off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from sidewalk_hf.evaluation import evaluate_pretrained
from sidewalk_hf.training.logs import configure_logging


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="save_pretrained folder, run folder (its best model) or Hub id"
    )
    parser.add_argument("--dataset", required=True, help="local dataset folder or Hub dataset id")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=8, help="per process")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--output", help="where eval_<split>.json goes (default: the model folder)")
    parser.add_argument("--num_pictures", type=int, default=6)
    parser.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last memory format, as training's validation uses by default",
    )
    args = parser.parse_args()
    process = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    configure_logging(process.process_index, process.is_local_main_process)
    evaluate_pretrained(
        args.model,
        args.dataset,
        args.split,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        output_dir=args.output,
        num_pictures=args.num_pictures,
        channels_last=args.channels_last,
    )


if __name__ == "__main__":
    main()
