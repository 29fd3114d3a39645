"""Input pipeline throughput: chips per second through stream -> decode -> augment -> collate -> model input.

For each chip size and DataLoader worker count this measures

- ``read``: undecoded records only (the parquet stream every worker reads in full);
- ``decode``: the same records with each worker decoding its share (image JPEG and mask PNG), the
  ceiling for the full pipeline;
- ``transfer``: batches of the full pipeline's shapes and dtypes (uint8 pixel values and labels, float32
  normalisation coefficients) made of zeros in the workers, i.e. only the cost of handing finished
  batches to the main process (shared memory), which the decode-only rate does not pay;
- ``full``: what a training step consumes: ``SegmentationStream`` in training mode (shuffle, decode,
  checks, random scale/crop/flip, colour jitter and normalisation coefficients, batch assembly) through
  ``make_dataloader``, then ``batch_to_model_inputs`` on the CPU in the main process (float32 normalised
  pixel values, int64 labels), where a GPU run would do that step on the GPU.

Each rate is the best of ``--passes`` passes, each pass timed from its first batch so that worker
start-up is left out; the passes of the four measurements are interleaved, so that a change in the load
of a shared machine disturbs them alike. Torch runs single-threaded in the main process, as it does in
DataLoader workers, so that ``workers 0`` measures one core. The goal is ``full`` within 2x of ``decode``
at the same worker count.

    python bench/data_throughput.py                 # 200 chips of 256 and 512 px, workers 0/1/2
    python bench/data_throughput.py --chips 400 --sizes 256 --workers 0 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.utils.data

from sidewalk_hf.data import SegmentationStream, batch_to_model_inputs, make_dataloader, open_split
from sidewalk_hf.data.streaming import decode_image, decode_mask
from sidewalk_hf.data.synthetic import generate_synthetic_dataset

IMAGENET = {
    "image_mean": [123.675, 116.28, 103.53],
    "image_std": [58.395, 57.12, 57.375],
    "rescale_factor": 1.0,
}


class _UndecodedRecords(torch.utils.data.IterableDataset):
    """The split's undecoded records in batches; with ``decode`` each worker decodes its share of them.

    Reads exactly as ``SegmentationStream`` does (every worker reads the whole stream), so the difference
    to the full pipeline is the work done per chip after decoding.
    """

    def __init__(self, source: Path, split: str, batch_size: int, decode: bool):
        self.records = open_split(source, split).select_columns(["image", "mask"])
        self.records = self.records.cast_column("image", datasets.Image(decode=False))
        self.records = self.records.cast_column("mask", datasets.Image(decode=False)).with_format("arrow")
        self.batch_size, self.decode = batch_size, decode

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for step, table in enumerate(self.records.iter(batch_size=self.batch_size)):
            if step % num_workers != worker_id:
                continue
            if self.decode:
                for image_cell, mask_cell in zip(
                    table.column("image").to_pylist(), table.column("mask").to_pylist()
                ):
                    image = decode_image(image_cell, 3)
                    decode_mask(mask_cell, tuple(image.shape[-2:]))
            yield table.num_rows


class _ZeroBatches(torch.utils.data.IterableDataset):
    """Batches shaped like the full pipeline's, with no work behind them: the cost of the hand-over."""

    def __init__(self, num_batches: int, batch_size: int, chip_size_px: int):
        self.num_batches, self.batch_size, self.chip_size_px = num_batches, batch_size, chip_size_px

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        size = self.chip_size_px
        for step in range(worker_id, self.num_batches, num_workers):
            yield {
                "pixel_values": torch.zeros(self.batch_size, 3, size, size, dtype=torch.uint8),
                "labels": torch.zeros(self.batch_size, size, size, dtype=torch.uint8),
                "pixel_normalization": torch.zeros(self.batch_size, 3, 3),
                "record_index": torch.arange(self.batch_size),
            }


def _consume(batch: dict) -> int:
    """What the training loop does with a batch before the model: float32 normalised inputs (here on
    the CPU); returns the number of chips."""
    pixel_values, _labels = batch_to_model_inputs(batch, "cpu")
    return pixel_values.shape[0]


def _chips_per_second(loader, count_chips) -> float:
    """Steady-state rate of one pass, timed from its first batch."""
    iterator = iter(loader)
    next(iterator)
    chips, start = 0, time.perf_counter()
    for batch in iterator:
        chips += count_chips(batch)
    return chips / (time.perf_counter() - start)


def run(
    chips: int, sizes: list[int], workers: list[int], batch_size: int, passes: int, data_root: Path
) -> list[dict]:
    rows = []
    for size in sizes:
        source = data_root / f"synthetic-{size}px-{chips}"
        if not source.exists():
            print(f"generating {chips} chips of {size} px in {source} ...", flush=True)
            generate_synthetic_dataset(
                source, num_train=chips, num_validation=0, num_test=0, chip_size_px=size
            )
        for num_workers in workers:
            measurements = {}
            for name, decode in (("read", False), ("decode", True)):
                loader = torch.utils.data.DataLoader(
                    _UndecodedRecords(source, "train", batch_size, decode),
                    batch_size=None,
                    num_workers=num_workers,
                )
                measurements[name] = (loader, int)
            zeros = _ZeroBatches(chips // batch_size, batch_size, size)
            measurements["transfer"] = (
                torch.utils.data.DataLoader(zeros, batch_size=None, num_workers=num_workers),
                lambda b: len(b["record_index"]),
            )
            stream = SegmentationStream(
                source,
                "train",
                per_process_batch_size=batch_size,
                training=True,
                crop_size_px=size,
                buffer_batches=8,
                **IMAGENET,
            )
            measurements["full"] = (make_dataloader(stream, num_workers), _consume)
            # Passes interleaved, the best of each kept: a change of the machine's load (it may be shared)
            # then affects all four alike, and the best pass is the least disturbed one.
            rates = dict.fromkeys(measurements, 0.0)
            for _ in range(passes):
                for name, (loader, count_chips) in measurements.items():
                    rates[name] = max(rates[name], _chips_per_second(loader, count_chips))
            row = {
                "chip_size_px": size,
                "num_workers": num_workers,
                "read_chips_per_s": round(rates["read"], 1),
                "decode_chips_per_s": round(rates["decode"], 1),
                "transfer_chips_per_s": round(rates["transfer"], 1),
                "full_chips_per_s": round(rates["full"], 1),
                "full_time_over_decode_time": round(rates["decode"] / rates["full"], 2),
            }
            rows.append(row)
            print(
                f"{size:>5} px  workers {num_workers}  read {row['read_chips_per_s']:>8.1f}  "
                f"decode {row['decode_chips_per_s']:>7.1f}  transfer {row['transfer_chips_per_s']:>8.1f}  "
                f"full {row['full_chips_per_s']:>7.1f}  "
                f"full/decode time {row['full_time_over_decode_time']:.2f}x",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=200, help="training chips per size (default 200)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="chip sizes in px")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=8, help="per-process batch size (default 8)")
    parser.add_argument(
        "--passes", type=int, default=3, help="passes per measurement; the best counts (default 3)"
    )
    parser.add_argument("--data-root", type=Path, default=None, help="where to keep the generated datasets")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "data_throughput.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    load_before = os.getloadavg()  # the machine may be shared: its load qualifies the figures
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root or Path(tmp)
        rows = run(args.chips, args.sizes, args.workers, args.batch_size, args.passes, data_root)
    load_after = os.getloadavg()

    header = (
        f"{'chip px':>8} {'workers':>8} {'read/s':>9} {'decode/s':>9} {'transfer/s':>11} {'full/s':>9} "
        f"{'full time / decode time':>24}"
    )
    print("\n" + header)
    for row in rows:
        print(
            f"{row['chip_size_px']:>8} {row['num_workers']:>8} {row['read_chips_per_s']:>9.1f} "
            f"{row['decode_chips_per_s']:>9.1f} {row['transfer_chips_per_s']:>11.1f} {row['full_chips_per_s']:>9.1f} "
            f"{row['full_time_over_decode_time']:>23.2f}x"
        )
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after "
        + ", ".join(f"{x:.2f}" for x in load_after)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "data_throughput",
        "chips_per_size": args.chips,
        "batch_size": args.batch_size,
        "passes": args.passes,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": {"before": load_before, "after": load_after},
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "datasets": datasets.__version__, "numpy": np.__version__},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
