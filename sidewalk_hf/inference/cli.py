"""Command line of ``scripts/predict.py``: flags for the common options, the ``INFERENCE:`` config for all."""

from __future__ import annotations

import argparse
import logging
import sys

# Dedicated flags and the config key each one sets.
FLAG_KEYS = {
    "window_px": "INFERENCE.WINDOW_PX",
    "stride": "INFERENCE.STRIDE_FRACTION",
    "blend": "INFERENCE.BLEND",
    "batch_size": "INFERENCE.BATCH_SIZE",
    "num_workers": "INFERENCE.NUM_WORKERS",
    "dtype": "INFERENCE.DTYPE",
    "bands": "INFERENCE.BANDS",
    "scale": "INFERENCE.SCALE",
    "engine": "INFERENCE.ENGINE",
    "ray_address": "INFERENCE.RAY_ADDRESS",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict sidewalk masks over rasters (GeoTIFF, COG, VRT) in their own CRS and grid.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model", required=True, help="save_pretrained folder, run folder (its best/) or Hub id"
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help="rasters, folders or globs")
    parser.add_argument("--out", required=True, help="output folder (masks, probabilities, run.json)")
    parser.add_argument("--config", help="YAML config (its INFERENCE: section): a path or a name in configs/")
    parser.add_argument(
        "--window-px", dest="window_px", type=int, help="window size (default: training chip)"
    )
    parser.add_argument("--stride", type=float, help="stride as a fraction of the window (default 0.75)")
    parser.add_argument("--blend", choices=["cosine", "gaussian", "none"])
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="windows per batch")
    parser.add_argument(
        "--num-workers", dest="num_workers", type=int, help="DataLoader workers reading windows"
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    parser.add_argument("--bands", help="1-based bands in model order, e.g. 4,2,3")
    parser.add_argument("--scale", help="none | fixed:LO,HI[;LO,HI...] | percentiles:P,Q")
    parser.add_argument("--write-probs", dest="write_probs", action="store_true", help="also <stem>.prob.tif")
    parser.add_argument("--no-vectors", dest="no_vectors", action="store_true", help="skip the network stage")
    parser.add_argument("--engine", choices=["local", "ray"])
    parser.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: local/auto)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: Accelerate's choice)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="keep finished outputs, run the rest")
    start.add_argument("--overwrite", action="store_true", help="replace a previous run's outputs")
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="override any config key: INFERENCE.BLEND gaussian",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..geo.raster import PixelRule, RasterInputError
    from ..training.config import ConfigError, flag_overrides, load_config
    from .predictor import InferenceOptions
    from .run import OutputFolderError, predict_rasters

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    overrides = flag_overrides(args, FLAG_KEYS)
    if args.write_probs:
        overrides += ["INFERENCE.WRITE_PROBS", "true"]
    if args.no_vectors:
        overrides += ["INFERENCE.VECTORS", "false"]
    try:
        cfg = load_config(args.config, list(args.opts) + overrides)
        inf = cfg.INFERENCE
        options = InferenceOptions(
            window_px=inf.WINDOW_PX,
            stride_fraction=inf.STRIDE_FRACTION,
            blend=inf.BLEND,
            batch_size=inf.BATCH_SIZE,
            num_workers=inf.NUM_WORKERS,
            dtype=inf.DTYPE,
            write_probs=inf.WRITE_PROBS,
            rule=PixelRule.parse(inf.BANDS or None, inf.SCALE or None),
        )
        manifest = predict_rasters(
            args.model,
            args.input,
            args.out,
            options,
            engine=inf.ENGINE,
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
            optimize=inf.OPTIMIZE,
            ray_address=inf.RAY_ADDRESS or None,
            ray_num_actors=inf.RAY_NUM_ACTORS,
            command=[sys.executable, *sys.argv],
        )
    except (ConfigError, RasterInputError, OutputFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not manifest:  # a non-main process under accelerate launch: the main one reports
        return 0
    if inf.VECTORS:
        _vectorize_outputs(manifest, args.out, cfg)
    return _report(manifest, args.out)


def _vectorize_outputs(manifest: dict, out_dir: str, cfg) -> None:
    """The sidewalk-network stage on every finished mask (when that stage is installed)."""
    try:
        from ..network.vectorize import vectorize_run
    except ImportError:
        logging.getLogger(__name__).warning("the sidewalk-network stage is not available; masks only")
        return
    from pathlib import Path

    masks = [
        Path(out_dir) / e["outputs"]["mask"]["path"]
        for e in manifest["inputs"].values()
        if e["status"] == "ok"
    ]
    if masks:
        vectorize_run(masks, Path(out_dir), cfg)


def _report(manifest: dict, out_dir: str) -> int:
    summary = manifest["summary"]
    seconds = sum(e.get("seconds", 0) for e in manifest["inputs"].values())
    windows = sum(e.get("windows_run", 0) for e in manifest["inputs"].values())
    print(
        f"{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped of {summary['inputs']} "
        f"inputs; {windows} windows in {seconds:.1f} s ({windows / max(seconds, 1e-9):.1f} chips/s); {out_dir}/run.json"
    )
    failed = {path: e["error"] for path, e in manifest["inputs"].items() if e["status"] == "failed"}
    for path, error in failed.items():
        print(f"FAILED {path}: {error}", file=sys.stderr)
    return 1 if failed else 0
