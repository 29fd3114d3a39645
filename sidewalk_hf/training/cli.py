"""Command-line arguments of ``scripts/train.py``: --config or --resume, a few dedicated flags, --opts."""

from __future__ import annotations

import argparse

from .config import flag_overrides

# Dedicated flags and the config key each one sets.
FLAG_KEYS = {
    "weights_path": "MODEL.WEIGHTS",
    "batch_size": "DATALOADER.BATCH_SIZE",
    "buffer_batches": "DATALOADER.BUFFER_BATCHES",
    "num_workers": "DATALOADER.NUM_WORKERS",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the sidewalk DeepLabV3+ model. Run under `accelerate launch` for several processes.",
        allow_abbrev=False,
    )
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--config", help="YAML config: a path, or a bare name looked up in configs/ (base.yaml)"
    )
    start.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its newest checkpoint")
    parser.add_argument("--weights_path", help="initial weights: Detectron2 .pkl or a save_pretrained folder")
    parser.add_argument("--batch_size", type=int, help="GLOBAL batch size (all processes together)")
    parser.add_argument("--buffer_batches", type=int, help="shuffle buffer, in per-process batches")
    parser.add_argument("--num_workers", type=int, help="DataLoader workers per process")
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="override any config key: --opts SOLVER.BASE_LR 0.002 MODEL.LOSS.CLASS_WEIGHTS '[1.0, 5.0]'",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.cli_overrides = flag_overrides(args, FLAG_KEYS)
    if args.resume and args.cli_overrides:
        parser.error("--resume continues a run with its own config; change keys with --opts if you must")
    return args
