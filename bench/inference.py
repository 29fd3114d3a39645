"""Inference throughput: `pipeline("image-segmentation")` versus calling our model directly in batches.

    python bench/inference.py                                  # CPU: 32 random 256-px chips, R-101
    python bench/inference.py --backbone resnet18 --images 64
    python bench/inference.py --device cuda --amp bf16 --batch-size 16 --size-px 512

A random-initialised model (default config, or `--backbone`) is written with `save_pretrained_with_processor`
to a temporary folder, which every contender loads, as users do:

- `pipeline`, called on the list of PIL chips, once with its default batch size of 1 and once with
  `--batch-size`;
- `pipeline fast`: the pipeline (batch size 1) over our model after `optimize_for_inference()`, in bf16
  weights with `--amp bf16` (a pipeline casts its inputs to the model's dtype);
- `direct eager`: image processor, model in float32 NCHW under `torch.no_grad`, argmax, in batches;
- `direct fast`: the same in our inference defaults: `optimize_for_inference()` (batch norms folded into the
  convolutions, channels-last), `torch.inference_mode` (and bf16 autocast with `--amp bf16`).

All include pre-processing (PIL to normalised tensors) and the class map at the end. Before timing, the
pipeline's masks for the first chip and both direct paths' class maps must agree (at least 98% of pixels;
random weights leave near-ties that memory layouts can flip). Images/s are medians of `--repeats` rounds
taken round-robin after `--warmup` untimed rounds. Peak memory is measured for each contender in a fresh
process that loads the folder and runs every chip once: peak RSS of that process on a CPU (polled with
psutil), `torch.cuda.max_memory_allocated` on a GPU. Needs the `bench` extra (psutil).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import psutil
import timm
import torch
from common import (
    RESULTS_DIR,
    describe_disturbance,
    describe_machine,
    interleaved_seconds,
    machine_info,
    print_table,
    set_up_device,
    write_json,
)
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, pipeline

from sidewalk_hf import (
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    SidewalkImageProcessor,
    save_pretrained_with_processor,
)

CONTENDERS = ("pipeline batch 1", "pipeline batch B", "pipeline fast batch 1", "direct eager", "direct fast")
MIN_AGREEMENT = 0.98
MEMORY_MARKER = "peak memory: "


def multi_grid_for(backbone: str) -> list[int]:
    """Detectron2's multi-grid (1, 2, 4, ...) with one entry per block of the backbone's last ResNet stage."""
    with torch.device("meta"):
        model = timm.create_model(backbone, features_only=True)
    last_stage = getattr(model, model.feature_info.module_name()[-1].replace(".", "_"), None)
    num_blocks = len(list(last_stage.children())) if isinstance(last_stage, torch.nn.Sequential) else 3
    return [2**index for index in range(num_blocks)]


def write_model_folder(backbone: str, folder: Path) -> None:
    config = SidewalkDeepLabConfig(backbone=backbone, res5_multi_grid=multi_grid_for(backbone))
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(config)
    save_pretrained_with_processor(model, SidewalkImageProcessor.from_model_config(config), folder)


def random_chips(count: int, size_px: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size_px, size_px, 3), dtype=np.uint8), mode="RGB")
        for _ in range(count)
    ]


class Contenders:
    """The four ways of segmenting a list of chips, all loaded from the same saved folder."""

    def __init__(self, folder: Path, device: torch.device, batch_size: int, amp: str, names=CONTENDERS):
        self.device, self.batch_size = device, batch_size
        self.processor = SidewalkImageProcessor.from_pretrained(folder)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
        if any(name.startswith("pipeline") for name in names):
            self.segmenter = pipeline(
                "image-segmentation", model=str(folder), device=device, trust_remote_code=True
            )
        if "pipeline fast batch 1" in names:
            fast_model = self.load_model(folder).optimize_for_inference(channels_last=True)
            if amp == "bf16":  # a pipeline casts its inputs to the model's dtype
                fast_model = fast_model.to(torch.bfloat16)
            self.fast_segmenter = pipeline(
                "image-segmentation", model=fast_model, image_processor=self.processor, device=device
            )
        if "direct eager" in names:
            self.eager_model = self.load_model(folder)
        if "direct fast" in names:
            self.fast_model = self.load_model(folder).optimize_for_inference(channels_last=True)

    def load_model(self, folder: Path) -> torch.nn.Module:
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
        return model.to(self.device).eval()

    def run(self, name: str, chips: list[Image.Image]):
        if name == "pipeline batch 1":
            return self.segmenter(chips)
        if name == "pipeline batch B":
            return self.segmenter(chips, batch_size=self.batch_size)
        if name == "pipeline fast batch 1":
            with torch.inference_mode():
                return self.fast_segmenter(chips)
        if name == "direct eager":
            return self.direct(self.eager_model, chips, torch.no_grad, nullcontext(), torch.contiguous_format)
        return self.direct(self.fast_model, chips, torch.inference_mode, self.autocast, torch.channels_last)

    def direct(self, model, chips, grad_mode, autocast, memory_format) -> list[torch.Tensor]:
        class_maps = []
        for start in range(0, len(chips), self.batch_size):
            inputs = self.processor(images=chips[start : start + self.batch_size], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device).contiguous(memory_format=memory_format)
            with grad_mode(), autocast:
                logits = model(pixel_values=pixel_values).logits
            if logits.shape[-2:] != pixel_values.shape[-2:] or not torch.isfinite(logits).all():
                raise RuntimeError(f"logits {tuple(logits.shape)} for inputs {tuple(pixel_values.shape)}")
            class_maps.extend(logits.argmax(dim=1).to(torch.uint8).cpu())
        return class_maps


def pipeline_class_map(segments: list[dict], label2id: dict[str, int]) -> torch.Tensor:
    """The class map the pipeline's per-label masks describe (255 where no mask covers a pixel)."""
    size = segments[0]["mask"].size
    class_map = torch.full((size[1], size[0]), 255, dtype=torch.uint8)
    for segment in segments:
        class_map[torch.from_numpy(np.array(segment["mask"]) > 0)] = label2id[segment["label"]]
    return class_map


def check_comparable(contenders: Contenders, chips: list[Image.Image], label2id: dict[str, int]) -> dict:
    """Every path must segment the first batch of chips into the same input-sized class maps."""
    first = chips[: contenders.batch_size]
    eager = contenders.run("direct eager", first)
    fast = contenders.run("direct fast", first)
    piped = contenders.run("pipeline batch B", first)
    piped_fast = contenders.run("pipeline fast batch 1", first)
    size = (first[0].height, first[0].width)
    agreement = {}
    for name, maps in (
        ("direct fast", fast),
        ("pipeline", [pipeline_class_map(s, label2id) for s in piped]),
        ("pipeline fast", [pipeline_class_map(s, label2id) for s in piped_fast]),
    ):
        if len(maps) != len(first) or any(tuple(m.shape) != size for m in maps):
            raise RuntimeError(f"{name} returned {len(maps)} maps of shapes {[tuple(m.shape) for m in maps]}")
        agreement[name] = float(torch.stack([m == e for m, e in zip(maps, eager)]).float().mean())
        if agreement[name] < MIN_AGREEMENT:
            raise RuntimeError(f"{name} agrees with direct eager on {agreement[name]:.1%} of pixels only")
    return agreement


class PeakRSS:
    """Peak resident memory of this process while the block runs, polled every `period_s` seconds."""

    def __init__(self, period_s: float = 0.005):
        self.period_s, self.peak_bytes, self.process = period_s, 0, psutil.Process()
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            self._stop.wait(self.period_s)

    def __enter__(self):
        self.peak_bytes = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)


def measure_memory_in_this_process(args) -> None:
    """Child mode: load one contender, segment every chip once, print its peak memory as JSON."""
    device = torch.device(args.device)
    chips = random_chips(args.images, args.size_px)
    contenders = Contenders(args.folder, device, args.batch_size, args.amp, names=(args.measure_memory,))
    loaded_rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as peak:
        contenders.run(args.measure_memory, chips)
    result = {"rss_after_load_mib": loaded_rss / 2**20, "peak_rss_mib": peak.peak_bytes / 2**20}
    if device.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(MEMORY_MARKER + json.dumps(result))


def memory_of(name: str, args, folder: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure-memory",
        name,
        "--folder",
        str(folder),
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--images",
        str(args.images),
        "--size-px",
        str(args.size_px),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    lines = [line for line in finished.stdout.splitlines() if line.startswith(MEMORY_MARKER)]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"memory run of {name!r} failed:\n{finished.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(MEMORY_MARKER))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet101s", help="timm backbone of the random model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast of 'direct fast'")
    parser.add_argument("--images", type=int, default=32, help="random chips per round")
    parser.add_argument("--size-px", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="B of the batched contenders")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "inference.json")
    parser.add_argument("--measure-memory", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = set_up_device(parser, args)
    if args.measure_memory:
        measure_memory_in_this_process(args)
        return

    machine = machine_info(device)
    print(f"machine: {describe_machine(machine)}")
    with tempfile.TemporaryDirectory(prefix="sidewalk-inference-bench-") as folder:
        folder = Path(folder)
        write_model_folder(args.backbone, folder)
        label2id = SidewalkDeepLabConfig.from_pretrained(folder).label2id
        chips = random_chips(args.images, args.size_px)
        contenders = Contenders(folder, device, args.batch_size, args.amp)
        agreement = check_comparable(contenders, chips, label2id)
        print(
            f"class maps agree with direct eager: {', '.join(f'{k} {v:.2%}' for k, v in agreement.items())}"
        )

        print(
            f"timing {len(CONTENDERS)} contenders on {args.images} chips "
            f"({args.warmup} warm-up + {args.repeats} rounds)",
            flush=True,
        )
        seconds = interleaved_seconds(
            {name: (lambda name=name: contenders.run(name, chips)) for name in CONTENDERS},
            warmup=args.warmup,
            repeats=args.repeats,
            device=device,
        )
        print(describe_disturbance(seconds))
        print("peak memory, one fresh process per contender", flush=True)
        memory = {name: memory_of(name, args, folder) for name in CONTENDERS}

    batch_of = {"pipeline batch 1": 1, "pipeline fast batch 1": 1}
    rows = []
    for name in CONTENDERS:
        rows.append(
            {
                "contender": name.replace("batch B", f"batch {args.batch_size}"),
                "batch": batch_of.get(name, args.batch_size),
                "images_per_s": args.images / seconds.median(name),
                "round_seconds": seconds.seconds[name],
                "foreign_cores": seconds.foreign_cores[name],
                **memory[name],
            }
        )
    eager_rate = next(row["images_per_s"] for row in rows if row["contender"] == "direct eager")
    for row in rows:
        row["speed_vs_direct_eager"] = row["images_per_s"] / eager_rate

    print(
        f"\n{args.backbone}, {args.images} chips of {args.size_px} px, {device.type}"
        f"{', direct fast in bf16' if args.amp == 'bf16' else ''}"
    )
    columns = [
        ("contender", "contender", ""),
        ("images_per_s", "images/s", ".2f"),
        ("speed_vs_direct_eager", "vs direct eager", ".2f"),
        ("rss_after_load_mib", "RSS loaded MiB", ".0f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"),
    ]
    if device.type == "cuda":
        columns.append(("cuda_max_allocated_mib", "CUDA peak MiB", ".0f"))
    print_table(rows, columns)
    machine["load_average_1min_at_end"] = machine_info(device)["load_average_1min"]
    write_json(
        args.json,
        {
            "benchmark": "inference",
            "machine": machine,
            "settings": {**vars(args), "json": str(args.json), "folder": None},
            "agreement_with_direct_eager": agreement,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
