"""Regenerate the demo Space's example inputs (space/examples/): synthetic test-split chips and a small GeoTIFF.

python scripts/make_space_examples.py [--out space/examples] [--seed 0]
"""

from __future__ import annotations

import argparse

from sidewalk_hf.space import SPACE_DIR, write_space_examples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(SPACE_DIR / "examples"), help="folder to write (default space/examples)"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    parser.add_argument("--chips", type=int, default=2, help="number of chips (default 2)")
    parser.add_argument(
        "--chip-size", type=int, default=128, help="chip side in px (default 128, the demo's)"
    )
    parser.add_argument(
        "--scene-size", type=int, default=384, help="GeoTIFF side in px; 0 for none (default 384)"
    )
    args = parser.parse_args(argv)
    paths = write_space_examples(
        args.out,
        seed=args.seed,
        num_chips=args.chips,
        chip_size_px=args.chip_size,
        scene_size_px=args.scene_size,
    )
    for path in paths:
        print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
