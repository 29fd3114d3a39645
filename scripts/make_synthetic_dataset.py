"""Write the synthetic aerial sidewalk dataset in the Hugging Face Hub layout.

python scripts/make_synthetic_dataset.py --out data/synthetic --train 2000 --validation 200 --test 200 --size 256 --seed 0
"""

from __future__ import annotations

import argparse

from sidewalk_hf.data.synthetic import generate_synthetic_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)"
    )
    parser.add_argument("--train", type=int, required=True, help="number of training chips")
    parser.add_argument("--validation", type=int, required=True, help="number of validation chips")
    parser.add_argument("--test", type=int, required=True, help="number of test chips")
    parser.add_argument("--size", type=int, default=256, help="chip side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--num-shards", type=int, default=4, help="parquet shards per split (default 4)")
    parser.add_argument(
        "--occluded-fraction",
        type=float,
        default=0.07,
        help="average share of sidewalk pixels hidden under tree canopies (default 0.07)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    out_dir = generate_synthetic_dataset(
        args.out,
        num_train=args.train,
        num_validation=args.validation,
        num_test=args.test,
        chip_size_px=args.size,
        seed=args.seed,
        num_shards=args.num_shards,
        occluded_sidewalk_fraction=args.occluded_fraction,
        overwrite=args.overwrite,
    )
    print(f"wrote {out_dir} (see {out_dir / 'README.md'} and {out_dir / 'contact_sheet.png'})")


if __name__ == "__main__":
    main()
