"""Convert a Detectron2 DeepLabV3+ model-zoo pickle into a `save_pretrained` folder of the sidewalk model.

    python scripts/convert_detectron2_checkpoint.py model_final_a8a355.pkl converted/ --num-labels 2

The folder loads with `AutoModelForSemanticSegmentation.from_pretrained(OUT_DIR, trust_remote_code=True)` and
`pipeline("image-segmentation", model=OUT_DIR, trust_remote_code=True)`.
"""

import argparse
import sys

from sidewalk_hf.convert_detectron2 import (
    Detectron2CheckpointError,
    UnsafePickleError,
    convert_detectron2_checkpoint,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="Detectron2 model-zoo .pkl file (a pickle of numpy arrays)")
    parser.add_argument("output_dir", help="folder to write the converted model to")
    parser.add_argument(
        "--num-labels",
        type=int,
        default=2,
        help="classes of the converted model; the checkpoint's predictor is dropped when it has another "
        "count (default: 2, background and sidewalk; 19 keeps the Cityscapes predictor)",
    )
    parser.add_argument("--backbone", default="resnet101s", help="timm backbone name (default: resnet101s)")
    args = parser.parse_args(argv)
    try:
        report = convert_detectron2_checkpoint(
            args.checkpoint, args.output_dir, args.num_labels, args.backbone
        )
    except (FileNotFoundError, UnsafePickleError, Detectron2CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report)
    print(f"Wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
