"""The whole product on a synthetic scene: render a georeferenced GeoTIFF, predict it, extract the sidewalk
network, score it against the scene's true centerlines, and print where everything is.

    python scripts/demo_scene.py                          # the newest demo run's model
    python scripts/demo_scene.py --model runs/<run> --size 3072 2048 --out runs/<run>/scene_demo
"""

import argparse
import sys
from pathlib import Path

# This folder holds scripts/evaluate.py, which would shadow the `evaluate` package: keep it off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sidewalk_hf.network.scoring import format_table
from sidewalk_hf.scene_demo import run_scene_demo
from sidewalk_hf.training.config import load_config


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="run folder, save_pretrained folder or Hub id (default: newest runs/*demo*)"
    )
    parser.add_argument("--out", help="output folder (default: <run folder>/scene_demo)")
    parser.add_argument("--size", nargs=2, type=int, default=[2048, 2048], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--config", help="YAML config whose VECTOR: section the network stage uses")
    args = parser.parse_args()
    model = args.model
    if model is None:
        runs = sorted(p.parent.parent for p in Path("runs").glob("*demo*/best/config.json"))
        if not runs:
            parser.error("no runs/*demo*/best model: run `make demo` first, or pass --model")
        model = str(runs[-1])
    out = (
        Path(args.out)
        if args.out
        else (Path(model) / "scene_demo" if Path(model).is_dir() else Path("scene_demo"))
    )
    summary = run_scene_demo(
        model,
        out,
        height_px=args.size[0],
        width_px=args.size[1],
        seed=args.seed,
        cfg=load_config(args.config),
    )
    scores = summary["scores"]
    print(
        f"\nscene {summary['scene']['image']} ({args.size[0]} x {args.size[1]} px, {summary['scene']['gsd_m']} m/px)"
    )
    print(f"predicted {summary['prediction']['windows']} windows in {summary['prediction']['seconds']:.1f} s")
    print(format_table(scores))
    print(f"mask        {summary['prediction']['mask']}")
    print(f"centerlines {summary['network']['centerlines']}")
    print(f"overview    {summary['overview']} (detail: {summary['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
