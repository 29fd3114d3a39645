"""Score a centerline network against the truth: completeness / correctness / quality at buffers, APLS,
junction precision and recall, components, and clDice when both masks are given.

python scripts/score_network.py vectors/tile.centerlines.geojson scene.centerlines.geojson --buffer-m 1 2
python scripts/score_network.py PRED TRUTH --pred-mask out/tile.mask.tif --truth-mask scene.truth.tif --json s.json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sidewalk_hf.network.scoring import LayerError, cldice_rasters, format_table, score_files
from sidewalk_hf.training.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pred", help="predicted lines (GeoJSON, GeoPackage, ...)")
    parser.add_argument("truth", help="true lines")
    parser.add_argument("--buffer-m", nargs="+", type=float, default=None, help="VECTOR.SCORE_BUFFERS_M")
    parser.add_argument("--pred-mask", default=None, help="predicted mask GeoTIFF, for clDice")
    parser.add_argument("--truth-mask", default=None, help="true mask GeoTIFF, for clDice")
    parser.add_argument("--json", default=None, help="write the scores here (default: next to PRED)")
    parser.add_argument("--config", default=None, help="a config name in configs/ or a path")
    parser.add_argument(
        "--opts", nargs="*", default=[], help="KEY VALUE overrides, e.g. VECTOR.APLS_SNAP_M 3"
    )
    args = parser.parse_args(argv)
    if (args.pred_mask is None) != (args.truth_mask is None):
        parser.error("clDice needs both --pred-mask and --truth-mask")
    try:
        vector = load_config(args.config, args.opts).VECTOR
        scores = score_files(
            args.pred,
            args.truth,
            buffers_m=tuple(args.buffer_m or vector.SCORE_BUFFERS_M),
            control_spacing_m=vector.APLS_CONTROL_SPACING_M,
            snap_m=vector.APLS_SNAP_M,
            junction_radius_m=vector.JUNCTION_RADIUS_M,
        )
        if args.pred_mask:
            scores |= cldice_rasters(args.pred_mask, args.truth_mask)
    except (ConfigError, LayerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(scores))
    out = Path(args.json) if args.json else Path(args.pred).with_suffix(".scores.json")
    out.write_text(json.dumps(scores, indent=2) + "\n")
    print(f"scores: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
