"""Large-area inference: end-to-end throughput against the model alone, memory against raster size, seams.

    python bench/predict_raster.py                       # the demo run's model when there is one, else R-101
    python bench/predict_raster.py --model runs/<run> --batch-size 8 --dtype bf16
    python bench/predict_raster.py --device cuda --batch-size 32 --num-workers 4 --size-px 4096

- **throughput**: chips (windows) per second of `predict_rasters` over a synthetic scene (reading, scaling,
  blending, writing the mask COG included; and once more with `--write-probs`, the probability COG too)
  against the model alone on the same number of windows of the same size, batch and precision
  (`InferenceModel.logits` on ready uint8 batches: the "direct fast" path of bench/inference.py without its
  PIL pre-processing). Medians of `--repeats` runs, taken in turn. Target: end to end >= 0.85 x model alone.
- **memory**: peak RSS of the whole process tree (main process and DataLoader workers, polled with psutil)
  of a prediction run in a fresh process, for a 1024 x 1024 and a 1024 x 8192 raster with the same model and
  batch. Target: the larger within 100 MB of the smaller.
- **seams** (with a trained model only: the demo run's): the rate of class flips across window borders
  over the rate elsewhere, at the defaults and with disjoint windows (stride = window, no blending), on a
  rendered scene at the model's training scale. Target: <= 1.5 at the defaults; disjoint windows show >= 3.

Needs the `bench` and `geo` extras.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from common import RESULTS_DIR, describe_machine, machine_info, print_table, set_up_device, write_json

REPO = Path(__file__).resolve().parents[1]


def default_model(folder: Path, backbone: str, prefer_demo: bool) -> tuple[str, bool]:
    """The newest demo run's best model (unless ``--backbone`` is given), else a random ``backbone`` model."""
    runs = sorted((REPO / "runs").glob("*demo*/best/config.json"))
    if runs and prefer_demo:
        return str(runs[-1].parent), True
    from inference import write_model_folder

    write_model_folder(backbone, folder)
    return str(folder), False


def scene_for(model, out_dir: Path, height: int, width: int, name: str, seed: int = 0):
    from sidewalk_hf.data.scene import REFERENCE_GSD_M, write_scene

    # The renderer's scale of a chip of the model's training size: 256 px is 0.25 m/px, 128 px is 0.5 m/px.
    gsd = REFERENCE_GSD_M * 256 / (model.training_chip_px or 256)
    return write_scene(out_dir, name, height_px=height, width_px=width, seed=seed, gsd_m=gsd)


def options_for(args, model, **changes):
    from sidewalk_hf.inference import InferenceOptions

    base = {
        "window_px": model.training_chip_px or 256,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "dtype": args.dtype,
        "write_probs": True,
    }
    return InferenceOptions(**(base | changes))


def measure_throughput(args, model_ref: str, work: Path) -> dict:
    from sidewalk_hf.inference import WindowGrid, load_inference_model, predict_rasters

    model = load_inference_model(model_ref, device=args.device_name, dtype=args.dtype)
    scene = scene_for(model, work / "scene", args.size_px, args.size_px, "throughput")
    outputs = {"mask": options_for(args, model, write_probs=False), "mask_prob": options_for(args, model)}
    grid = WindowGrid.for_raster(
        args.size_px, args.size_px, outputs["mask"].window_px, outputs["mask"].stride_fraction
    )
    h, w = grid.window_shape
    rng = np.random.default_rng(0)
    batches = [
        torch.from_numpy(
            rng.integers(
                0, 256, (min(args.batch_size, len(grid) - i), model.num_channels, h, w), dtype=np.uint8
            )
        )
        for i in range(0, len(grid), args.batch_size)
    ]

    def model_alone() -> float:
        start = time.perf_counter()
        for batch in batches:
            model.logits(batch)
        return time.perf_counter() - start

    def end_to_end(kind: str, i: int) -> float:
        start = time.perf_counter()
        predict_rasters(
            model_ref,
            [str(scene.image)],
            work / f"out_{kind}{i}",
            outputs[kind],
            device=args.device_name,
            overwrite=True,
        )
        return time.perf_counter() - start

    model_alone()  # warm-up
    end_to_end("mask", -1)
    alone, e2e = [], {kind: [] for kind in outputs}
    for i in range(args.repeats):  # taken in turn, so that a change of the machine's load hits all alike
        alone.append(model_alone())
        for kind in outputs:
            e2e[kind].append(end_to_end(kind, i))
    load_s = _load_seconds(model_ref, args)
    result = {
        "windows": len(grid),
        "window_px": outputs["mask"].window_px,
        "model_alone_chips_per_s": len(grid) / statistics.median(alone),
        "model_load_s": load_s,
    }
    for kind, times in e2e.items():
        # predict_rasters loads the model on every call; its load time is not window throughput
        windows_s = [max(t - load_s, 1e-9) for t in times]
        result[f"end_to_end_{kind}_chips_per_s"] = len(grid) / statistics.median(windows_s)
        result[f"end_to_end_{kind}_with_load_chips_per_s"] = len(grid) / statistics.median(times)
        result[f"end_to_end_{kind}_runs_x_alone"] = [a / t for a, t in zip(alone, windows_s)]
    return result


def _load_seconds(model_ref: str, args) -> float:
    from sidewalk_hf.inference import load_inference_model

    times = []
    for _ in range(3):
        start = time.perf_counter()
        load_inference_model(model_ref, device=args.device_name, dtype=args.dtype)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TreePeakRss:
    """Peak summed RSS of a process and its children, polled."""

    def __init__(self, pid: int, period_s: float = 0.01):
        self.process, self.period, self.peak = psutil.Process(pid), period_s, 0
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while self.running:
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.period)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def measure_memory(args, model_ref: str, work: Path) -> list[dict]:
    from sidewalk_hf.inference import load_inference_model

    model = load_inference_model(model_ref, device=args.device_name, dtype=args.dtype)
    rows = []
    for height, width in ((1024, 1024), (1024, 8192)):
        scene = scene_for(model, work / "memory", height, width, f"m{width}")
        out = work / f"memory_out_{width}"
        command = [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            "--model",
            model_ref,
            "--input",
            str(scene.image),
            "--out",
            str(out),
            "--batch-size",
            str(args.batch_size),
            "--num-workers",
            str(args.num_workers),
            "--dtype",
            args.dtype,
            "--write-probs",
            "--no-vectors",
            "--overwrite",
            "--device",
            args.device_name,
        ]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        monitor = TreePeakRss(process.pid)
        _, stderr = process.communicate()
        peak = monitor.stop()
        if process.returncode:
            raise RuntimeError(stderr.decode()[-2000:])
        manifest = json.loads((out / "run.json").read_text())
        entry = next(iter(manifest["inputs"].values()))
        rows.append(
            {"raster": f"{height} x {width}", "windows": entry["windows_run"], "peak_rss_mib": peak / 2**20}
        )
    return rows


def measure_seams(args, model_ref: str, work: Path) -> list[dict]:
    import rasterio

    from sidewalk_hf.inference import WindowGrid, load_inference_model, predict_rasters, seam_ratio

    model = load_inference_model(model_ref, device=args.device_name, dtype=args.dtype)
    rows = []
    scenes = [
        scene_for(model, work / "seams", 1024, 1536, f"seam{seed}", seed=seed)
        for seed in range(args.seam_scenes)
    ]
    for label, changes in (
        ("defaults (stride 0.75, cosine)", {}),
        ("disjoint (stride 1.0, no blending)", {"stride_fraction": 1.0, "blend": "none"}),
    ):
        options = options_for(args, model, write_probs=False, **changes)
        out = work / f"seams_{len(rows)}"
        predict_rasters(
            model_ref, [str(s.image) for s in scenes], out, options, device=args.device_name, overwrite=True
        )
        ratios, ious = [], []
        for scene in scenes:
            with rasterio.open(out / f"{scene.image.stem}.mask.tif") as src:
                classes = src.read(1)
            with rasterio.open(scene.truth_mask) as src:
                truth = src.read(1)
            grid = WindowGrid.for_raster(*classes.shape, options.window_px, options.stride_fraction)
            ratios.append(seam_ratio(classes, grid, classes != 255)["seam_ratio"])
            valid = truth != 255
            ious.append(
                ((classes == 1) & (truth == 1) & valid).sum()
                / (((classes == 1) | (truth == 1)) & valid).sum()
            )
        rows.append(
            {"setting": label, "seam_ratio": float(np.mean(ratios)), "sidewalk_iou": float(np.mean(ious))}
        )
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="model folder / run folder / Hub id (default: the demo run, else random)"
    )
    parser.add_argument("--backbone", help="a random model of this timm backbone instead of the demo run's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=-1, help="-1: predict's default for the device")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--size-px", type=int, default=1024, help="side of the throughput scene")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seam-scenes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "memory", "seams"])
    args = parser.parse_args()
    device = set_up_device(parser, args)
    args.device_name = str(device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_ref, trained = (
            (args.model, True)
            if args.model
            else default_model(
                work / "model", args.backbone or "resnet101s", prefer_demo=args.backbone is None
            )
        )
        print(
            f"{describe_machine(machine_info(device))}\nmodel: {model_ref} ({'trained' if trained else 'random'})"
        )
        payload = {"model": model_ref, "args": vars(args), "machine": machine_info(device)}
        if "throughput" not in args.skip:
            result = measure_throughput(args, model_ref, work)
            payload["throughput"] = result
            alone = result["model_alone_chips_per_s"]
            rows = [{"what": "model alone", "chips_s": alone, "ratio": 1.0, "runs": ""}]
            for kind, label in (
                ("mask", "mask (the default outputs)"),
                ("mask_prob", "mask + --write-probs"),
            ):
                runs = " / ".join(f"{r:.2f}" for r in result[f"end_to_end_{kind}_runs_x_alone"])
                rows.append(
                    {
                        "what": f"end to end, {label}",
                        "chips_s": result[f"end_to_end_{kind}_chips_per_s"],
                        "ratio": result[f"end_to_end_{kind}_chips_per_s"] / alone,
                        "runs": runs,
                    }
                )
                rows.append(
                    {
                        "what": "  ... with model loading",
                        "chips_s": result[f"end_to_end_{kind}_with_load_chips_per_s"],
                        "ratio": result[f"end_to_end_{kind}_with_load_chips_per_s"] / alone,
                        "runs": "",
                    }
                )
            print_table(
                rows,
                [
                    ("what", "", "s"),
                    ("chips_s", "chips/s", ".1f"),
                    ("ratio", "x model alone", ".2f"),
                    ("runs", "each run, x alone", "s"),
                ],
            )
            verdicts = ", ".join(
                f"{kind} {'met' if row['ratio'] >= 0.85 else 'MISSED'}"
                for kind, row in zip(("mask", "mask + probs"), rows[1::2])
            )
            print(
                f"{result['windows']} windows of {result['window_px']} px, medians of {args.repeats} runs; "
                f"target end to end >= 0.85 x: {verdicts}"
            )
        if "memory" not in args.skip:
            rows = measure_memory(args, model_ref, work)
            payload["memory"] = rows
            print_table(
                rows,
                [
                    ("raster", "raster", "s"),
                    ("windows", "windows", "d"),
                    ("peak_rss_mib", "peak RSS MiB", ".0f"),
                ],
            )
            growth = rows[1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
            print(
                f"growth {growth:+.0f} MiB for 8x the pixels; target within 100 MB: {'met' if growth * 1.048576 <= 100 else 'MISSED'}"
            )
        if "seams" not in args.skip and trained:
            rows = measure_seams(args, model_ref, work)
            payload["seams"] = rows
            print_table(
                rows,
                [
                    ("setting", "setting", "s"),
                    ("seam_ratio", "seam ratio", ".2f"),
                    ("sidewalk_iou", "sidewalk IoU vs truth", ".3f"),
                ],
            )
        write_json(RESULTS_DIR / "predict_raster.json", payload)


if __name__ == "__main__":
    main()
