"""Speed of the `sidewalk_iou` metric against a per-image numpy histogram implementation of `mean_iou`.

The baseline is evaluate's `mean_iou` algorithm (0.4.6) as written there, minus its Arrow/PNG storage: per image,
mask the ignored pixels, then three `np.histogram` calls (intersection, prediction, reference), summed over the
dataset. Ours counts the same maps batch by batch into a confusion matrix. Both read the very same arrays, in the
same dtype, converted once by numpy before any timing (on a CPU ours gets zero-copy tensor views of them, so
neither side finds its maps freshly written into the cache, and no torch worker threads are left spinning from a
conversion while the timed code runs; on a GPU each batch is copied there before its timing starts). Each timing
is the best of `--repeats` runs (the machine may be shared; every run is recorded, with the load average). The
five `mean_iou` outputs must be identical, bit for bit.

    python bench/metric_speed.py                      # 500 maps of 512 x 512, CPU
    python bench/metric_speed.py --device cuda        # ours on the GPU (the baseline always runs on the CPU)
    python bench/metric_speed.py --threads 1          # steadiest on a CPU shared with other work

Writes bench/results/metric_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sidewalk_hf.metrics import SidewalkIoU

NUM_LABELS = 2
IGNORE_INDEX = 255
MEAN_IOU_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
GOAL_SPEEDUP = 50.0


def make_maps(num_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sidewalk-like uint8 maps: straight strips at random angles (class 1), an ignored border band (255), and
    predictions that paint the strips a little wider and flip a few scattered pixels."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    references = np.zeros((num_images, size, size), dtype=np.uint8)
    predictions = np.zeros((num_images, size, size), dtype=np.uint8)
    for i in range(num_images):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(64, 160)
        distance = np.abs(
            (cols * np.cos(angle) + rows * np.sin(angle) + rng.uniform(0, period)) % period - period / 2
        )
        half_width = rng.uniform(3, 8)
        references[i][distance < half_width] = 1
        predictions[i][distance < half_width + 1.5] = 1
        flips = rng.random((size, size)) < 0.02
        predictions[i][flips] = 1 - predictions[i][flips]
        references[i][: int(rng.integers(0, size // 8)), :] = IGNORE_INDEX
    return predictions, references


def mean_iou_per_image_histograms(predictions, references, num_labels: int, ignore_index: int) -> dict:
    """evaluate's `mean_iou` computation, one image at a time."""
    total_intersect = np.zeros((num_labels,), dtype=np.float64)
    total_union = np.zeros((num_labels,), dtype=np.float64)
    total_prediction = np.zeros((num_labels,), dtype=np.float64)
    total_label = np.zeros((num_labels,), dtype=np.float64)
    for prediction, label in zip(predictions, references):
        mask = np.not_equal(label, ignore_index)
        prediction = prediction[mask]
        label = label[mask]
        intersect = prediction[prediction == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_prediction = np.histogram(prediction, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_intersect += area_intersect
        total_union += area_prediction + area_label - area_intersect
        total_prediction += area_prediction
        total_label += area_label
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = total_intersect / total_union
        accuracy = total_intersect / total_label
        return {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": total_intersect.sum() / total_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }


def time_baseline(predictions: np.ndarray, references: np.ndarray) -> tuple[float, dict]:
    start = time.perf_counter()
    results = mean_iou_per_image_histograms(predictions, references, NUM_LABELS, IGNORE_INDEX)
    return time.perf_counter() - start, results


def time_ours(predictions, references, batch_size: int, device: torch.device) -> tuple[float, dict]:
    metric = SidewalkIoU(num_labels=NUM_LABELS, ignore_index=IGNORE_INDEX, device=device)
    elapsed = 0.0
    for start_index in range(0, len(predictions), batch_size):
        stop_index = start_index + batch_size
        # On the CPU these are views of the arrays, not copies.
        batch_predictions = torch.from_numpy(predictions[start_index:stop_index]).to(device)
        batch_references = torch.from_numpy(references[start_index:stop_index]).to(device)
        _synchronize(device)
        start = time.perf_counter()
        metric.add_batch(predictions=batch_predictions, references=batch_references)
        _synchronize(device)
        elapsed += time.perf_counter() - start
    start = time.perf_counter()
    results = metric.compute()
    elapsed += time.perf_counter() - start
    return elapsed, results


def time_reading(predictions: np.ndarray, references: np.ndarray, batch_size: int) -> float:
    """Seconds to merely read every input byte once, batch by batch (a maximum over each batch of each input, as
    unsigned words): the memory-bound floor of any exact CPU method, since every byte of every value must be
    looked at (a value such as 2**40 + 1 differs from 1 only in its high bytes)."""
    elapsed = 0.0
    for start_index in range(0, len(predictions), batch_size):
        stop_index = start_index + batch_size
        batch = (predictions[start_index:stop_index], references[start_index:stop_index])
        start = time.perf_counter()
        for array in batch:
            array.view(np.dtype(f"u{array.itemsize}")).max()
        elapsed += time.perf_counter() - start
    return elapsed


def _seconds(timed: tuple[float, dict]) -> float:
    return timed[0]


def _loads(load_average) -> str:
    return " ".join(f"{value:.2f}" for value in load_average)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--size", type=int, default=512, help="maps are size x size pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="maps per add_batch call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "metric_speed.json"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    predictions, references = make_maps(args.num_images, args.size, args.seed)
    load_average_at_start = os.getloadavg()
    rows = []
    for numpy_dtype in (np.uint8, np.int64):
        inputs = (predictions.astype(numpy_dtype, copy=False), references.astype(numpy_dtype, copy=False))
        baseline_runs = [time_baseline(*inputs) for _ in range(args.repeats)]
        ours_runs = [time_ours(*inputs, args.batch_size, device) for _ in range(args.repeats)]
        reading_s = min(time_reading(*inputs, args.batch_size) for _ in range(args.repeats))
        del inputs
        baseline_s, expected = min(baseline_runs, key=_seconds)
        ours_s, ours = min(ours_runs, key=_seconds)
        for key in MEAN_IOU_KEYS:
            np.testing.assert_array_equal(
                ours[key], expected[key], err_msg=f"{key} differs for {numpy_dtype}"
            )
        rows.append(
            {
                "inputs": np.dtype(numpy_dtype).name,
                "device": str(device),
                "images": args.num_images,
                "baseline_s": baseline_s,
                "ours_s": ours_s,
                "baseline_ms_per_image": 1e3 * baseline_s / args.num_images,
                "ours_ms_per_image": 1e3 * ours_s / args.num_images,
                "speedup": baseline_s / ours_s,
                "read_inputs_once_s": reading_s,
                "read_inputs_once_ms_per_image": 1e3 * reading_s / args.num_images,
                "baseline_runs_s": [_seconds(run) for run in baseline_runs],
                "ours_runs_s": [_seconds(run) for run in ours_runs],
                "identical_values": True,
                "mean_iou": float(ours["mean_iou"]),
            }
        )

    header = (
        f"{'inputs':<7} {'device':<7} {'images':>6} {'baseline s':>10} {'ours s':>8} "
        f"{'baseline ms/img':>15} {'ours ms/img':>11} {'speedup':>8}  values     {'read once ms/img':>16}"
    )
    print(
        f"{args.num_images} maps of {args.size}x{args.size}, {NUM_LABELS} classes, batches of {args.batch_size}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['inputs']:<7} {row['device']:<7} {row['images']:>6} {row['baseline_s']:>10.3f} "
            f"{row['ours_s']:>8.3f} {row['baseline_ms_per_image']:>15.3f} {row['ours_ms_per_image']:>11.3f} "
            f"{row['speedup']:>7.1f}x  identical  {row['read_inputs_once_ms_per_image']:>16.3f}"
        )
    verdicts = ", ".join(
        f"{row['inputs']} {row['speedup']:.1f}x ({'met' if row['speedup'] >= GOAL_SPEEDUP else 'not met'})"
        for row in rows
    )
    load_average_at_end = os.getloadavg()
    print(f"goal: >= {GOAL_SPEEDUP:.0f}x: {verdicts}")
    print(
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average (1, 5, 15 min) "
        f"{_loads(load_average_at_start)} at start, {_loads(load_average_at_end)} at end"
    )

    report = {
        "benchmark": "sidewalk_iou vs per-image numpy histograms (mean_iou semantics)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(load_average_at_start),
            "load_average_at_end": list(load_average_at_end),
            "processor": platform.processor() or platform.machine(),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "goal_speedup": GOAL_SPEEDUP,
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
