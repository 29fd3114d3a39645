"""Streaming at scale: bytes and records read per pass by W processes x n DataLoader workers, planned vs
whole-stream reading, in one run.

    python bench/stream_scale.py                                   # 800 chips of 128 px, W = 1 2 4, n = 0 1 2
    python bench/stream_scale.py --chips 6400 --chips-per-file 100 --processes 1 2 --workers 0 2

A synthetic training split is generated (``--chips-per-file`` chips per file, one row group each: the Hub
writes image datasets in groups of 100 rows); for each (mechanism, W, n), W independent processes (no torch.distributed: the stream needs only
its rank) each build a training ``SegmentationStream`` (process ``r`` of ``W``) and run one full pass through
a DataLoader with ``n`` workers, decoding and augmenting every batch as training does. Each process reports:

- bytes read: ``/proc/<pid>/io`` rchar of the process over the pass, read once its DataLoader workers
  have been joined (Linux adds a reaped child's reads to its parent's), minus what starting and joining
  ``n`` workers over an empty dataset reads (torch's start-up, ~250 kB per worker). Building the stream
  (resolving the files, reading footers or the dataset card) is counted apart, as metadata. The process
  first decodes its 2-chip validation split, so that the modules decoding imports are not read again by
  each worker. Of that, with workers, the main process's own reads before they are joined are what they
  hand over to it through pipes (it reads no data itself): a cost of any multi-worker DataLoader, shown
  apart ("worker->main") and left out of the data-only amplification;
- records read: the sum of the batches' ``records_read`` (records fetched from storage);
- chips/s: records in its batches / seconds of the pass (from the first ``next`` to the last batch);
- peak RSS: ``ru_maxrss`` of the process, and the largest of its workers' (``RUSAGE_CHILDREN``).

Amplification is the total over all processes divided by the split (its parquet files' bytes; its records).
The targets: planned reading <= 1.05 total read amplification for every W and n, chips/s per process at
W = 1 no lower than whole-stream reading, and flat peak RSS (also checked at ``--growth`` times the chips).
Shuffle quality is measured on a split of the same layout whose chips spell their index: the correlation
between a record's position in the files and in the pass (0 best) and distinct files per batch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, describe_machine, machine_info, print_table, write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
MECHANISMS = {"whole stream": "whole_stream", "planned": "parquet"}
IDENTITY = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "rescale_factor": 1.0}


def _rchar(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no rchar in /proc/{pid}/io")


class _NoRecords:
    """An iterable dataset with nothing in it: what a DataLoader's workers read when they read no data."""

    def __iter__(self):
        return iter(())


def worker_startup_bytes(num_workers: int) -> int:
    """rchar of starting and joining ``num_workers`` DataLoader workers that read nothing (torch's own
    start-up reads, the same for any dataset)."""
    import torch

    if num_workers == 0:
        return 0
    before = _rchar()
    dataset = type("NoRecords", (_NoRecords, torch.utils.data.IterableDataset), {})()
    list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers))
    return _rchar() - before


def one_process(args) -> dict:
    """The body of one bench process: build the stream, run one pass, report its reads (as JSON)."""
    import psutil
    import torch

    from sidewalk_hf.data import SegmentationStream, make_dataloader

    torch.set_num_threads(1)
    # Decode once here first, so that workers forked later do not count the imports decoding makes.
    warm_up = SegmentationStream(
        args.dataset,
        "validation",
        per_process_batch_size=2,
        training=False,
        read_plan=args.read_plan,
        **IDENTITY,
    )
    for _ in make_dataloader(warm_up):
        pass
    before_plan = _rchar()
    stream = SegmentationStream(
        args.dataset, "train", per_process_batch_size=args.batch_size, training=True,
        process_index=args.rank, num_processes=args.world, seed=0, buffer_batches=args.buffer_batches,
        crop_size_px=args.chip_size_px, read_plan=args.read_plan, **IDENTITY,
    )  # fmt: skip
    startup_bytes = worker_startup_bytes(args.num_workers)
    before_pass = _rchar()
    expected = stream.batches_per_pass
    loader = make_dataloader(stream, num_workers=args.num_workers)
    batches = iter(loader)
    records, records_read, started = 0, 0, time.perf_counter()
    for _ in range(expected):
        batch = next(batches)
        records += len(batch["record_index"])
        records_read += batch["records_read"]
    seconds = time.perf_counter() - started
    # The workers are still running, so this is the main process's own reads: with workers, what they
    # hand over through pipes (it reads no data itself).
    handed_over = _rchar() - before_pass if args.num_workers else 0
    leftover = sum(1 for _ in batches)  # the workers finish and are joined
    del batches, loader
    if psutil.Process().children():
        raise RuntimeError("DataLoader workers still running: their reads would not be counted")
    pass_bytes = _rchar() - before_pass - startup_bytes  # Linux adds a reaped child's reads to its parent's
    return {
        "rank": args.rank,
        "batches": expected + leftover,
        "records": records,
        "records_read": records_read,
        "bytes_read": pass_bytes,
        "handed_over_bytes": handed_over,
        "planning_bytes": before_pass - before_plan - startup_bytes,
        "worker_startup_bytes": startup_bytes,
        "seconds": seconds,
        "chips_per_s": records / max(seconds, 1e-9),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "dropped": stream.dropped_remainder_records,
    }


def run_job(args, dataset: Path, read_plan: str, world: int, num_workers: int) -> list[dict]:
    """W bench processes at once, as a launcher starts them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    processes = []
    for rank in range(world):
        command = [
            sys.executable, __file__, "--one-process", "--dataset", str(dataset), "--rank", str(rank),
            "--world", str(world), "--num-workers", str(num_workers), "--read-plan", read_plan,
            "--batch-size", str(args.batch_size), "--buffer-batches", str(args.buffer_batches),
            "--chip-size-px", str(args.chip_size_px),
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=1200)
        if process.returncode != 0:
            raise RuntimeError(f"bench process failed ({process.returncode}):\n{stderr[-4000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def generate(root: Path, num_chips: int, args) -> tuple[Path, int]:
    from sidewalk_hf.data.synthetic import generate_synthetic_dataset

    folder = root / f"synthetic-{num_chips}x{args.chip_size_px}px"
    if not (folder / "README.md").exists():
        print(f"generating {num_chips} chips of {args.chip_size_px} px in {folder}", flush=True)
        generate_synthetic_dataset(
            folder, num_train=num_chips, num_validation=2, num_test=2, chip_size_px=args.chip_size_px,
            seed=0, num_shards=max(1, num_chips // args.chips_per_file),
        )  # fmt: skip
    size = sum(path.stat().st_size for path in (folder / "data").glob("train-*.parquet"))
    return folder, size


# ---- shuffle quality ------------------------------------------------------------------------------------------


def _indexed_split(root: Path, num_chips: int, chips_per_file: int) -> Path:
    """Parquet files like the synthetic split's, of 4x4 chips whose red and green spell their index."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image
    from PIL import Image as PILImage

    def png(array) -> bytes:
        buffer = io.BytesIO()
        PILImage.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    features, mask = Features({"image": Image(), "mask": Image()}), png(np.zeros((4, 4), np.uint8))
    (root / "data").mkdir(parents=True, exist_ok=True)
    num_files = max(1, num_chips // chips_per_file)
    for shard in range(num_files):
        rows = []
        for index in range(shard * chips_per_file, (shard + 1) * chips_per_file):
            image = np.zeros((4, 4, 3), np.uint8)
            image[..., 0], image[..., 1] = index % 256, index // 256
            rows.append({"image": {"bytes": png(image), "path": None}, "mask": {"bytes": mask, "path": None}})
        path = root / "data" / f"train-{shard:05d}-of-{num_files:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), path, row_group_size=100)
    return root


def shuffle_quality(args, root: Path) -> list[dict]:
    """Both measures per mechanism, averaged over ``--shuffle-epochs`` passes (each pass reshuffles)."""
    from sidewalk_hf.data import SegmentationStream, make_dataloader

    source = _indexed_split(root / "indexed", args.chips, args.chips_per_file)
    rows = []
    for name, read_plan in MECHANISMS.items():
        stream = SegmentationStream(
            source, "train", per_process_batch_size=args.batch_size, training=True, seed=0,
            buffer_batches=args.buffer_batches, scale_range=(1.0, 1.0), flips=False, color_jitter=0.0,
            read_plan=read_plan, **IDENTITY,
        )  # fmt: skip
        correlations, files = [], []
        for epoch in range(args.shuffle_epochs):
            stream.set_epoch(epoch)
            batches = []
            for batch in make_dataloader(stream):
                pixels = batch["pixel_values"][:, :, 0, 0].long()
                batches.append((pixels[:, 0] + 256 * pixels[:, 1]).tolist())
            order = np.array([i for batch in batches for i in batch])
            pass_position = np.empty(args.chips)
            pass_position[order] = np.arange(len(order))
            used = np.sort(order)
            correlations.append(abs(np.corrcoef(used, pass_position[used])[0, 1]))
            files += [len({i // args.chips_per_file for i in batch}) for batch in batches]
        rows.append({"mechanism": name, "correlation": float(np.mean(correlations)),
                     "max_correlation": float(np.max(correlations)), "files_per_batch": float(np.mean(files)),
                     "min_files_per_batch": min(files)})  # fmt: skip
    # The floor of the correlation for a shuffle of whole files: files in a random order, each read in order.
    rng = np.random.default_rng(0)
    floor = []
    for _ in range(args.shuffle_epochs):
        files_order = rng.permutation(args.chips // args.chips_per_file)
        order = np.concatenate(
            [np.arange(f * args.chips_per_file, (f + 1) * args.chips_per_file) for f in files_order]
        )
        floor.append(abs(np.corrcoef(np.arange(len(order)), np.argsort(order))[0, 1]))
    rows.append({"mechanism": "files in random order", "correlation": float(np.mean(floor)),
                 "max_correlation": float(np.max(floor)), "files_per_batch": float("nan"),
                 "min_files_per_batch": 0})  # fmt: skip
    return rows


def print_shuffle_quality(args, quality: list[dict]) -> None:
    print(
        f"\nshuffle quality, W = 1, {args.chips} records in files of {args.chips_per_file}, batch "
        f"{args.batch_size}, buffer {args.buffer_batches} batches, mean of {args.shuffle_epochs} passes"
    )
    print_table(quality, [
        ("mechanism", "reading", "s"), ("correlation", "|corr(file pos, pass pos)|", ".3f"),
        ("max_correlation", "largest of a pass", ".3f"),
        ("files_per_batch", "distinct files per batch", ".2f"), ("min_files_per_batch", "fewest", "d"),
    ])  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chips", type=int, default=800, help="training chips")
    parser.add_argument("--chip-size-px", type=int, default=128)
    parser.add_argument("--chips-per-file", type=int, default=25)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=10, help="records per batch on each process")
    parser.add_argument("--speed-repeats", type=int, default=7, help="runs of W = 1, n = 0 (median chips/s)")
    parser.add_argument("--buffer-batches", type=int, default=16)
    parser.add_argument("--shuffle-epochs", type=int, default=5, help="passes the shuffle quality averages")
    parser.add_argument("--shuffle-only", action="store_true", help="measure only the shuffle quality")
    parser.add_argument("--growth", type=int, default=2, help="chips factor of the peak-RSS check (0: none)")
    parser.add_argument("--data-root", type=Path, default=None, help="keep generated datasets here")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "stream_scale.json")
    # one bench process
    parser.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--read-plan", default="parquet", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_process:
        print(json.dumps(one_process(args)))
        return

    machine = machine_info("cpu")
    print(f"machine: {describe_machine(machine)}")
    if args.shuffle_only:
        with tempfile.TemporaryDirectory(prefix="sidewalk-stream-scale-") as work_dir:
            print_shuffle_quality(args, shuffle_quality(args, Path(work_dir)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sidewalk-stream-scale-") as work_dir:
        data_root = args.data_root or Path(work_dir)
        dataset, dataset_bytes = generate(data_root, args.chips, args)
        rows = []
        for world in args.processes:
            for num_workers in args.workers:
                for name, read_plan in MECHANISMS.items():
                    results = run_job(args, dataset, read_plan, world, num_workers)
                    total_bytes = sum(r["bytes_read"] for r in results)
                    handed_over = sum(r["handed_over_bytes"] for r in results)
                    total_records = sum(r["records_read"] for r in results)
                    rows.append({
                        "processes": world, "workers": num_workers, "mechanism": name,
                        "mib_read": total_bytes / MIB,
                        "mib_read_per_process": max(r["bytes_read"] for r in results) / MIB,
                        "read_amplification": total_bytes / dataset_bytes,
                        "mib_handed_over": handed_over / MIB,
                        "data_read_amplification": (total_bytes - handed_over) / dataset_bytes,
                        "records_read": total_records, "record_amplification": total_records / args.chips,
                        "records_used": sum(r["records"] for r in results),
                        "dropped": results[0]["dropped"],
                        "steps": sorted({r["batches"] for r in results}),
                        "chips_per_s_per_process": float(np.mean([r["chips_per_s"] for r in results])),
                        "metadata_mib": sum(r["planning_bytes"] for r in results) / MIB,
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                        "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in results),
                        "per_process": results,
                    })  # fmt: skip
                    row = rows[-1]
                    print(f"  W={world} n={num_workers} {name}: {row['mib_read']:.1f} MiB read "
                          f"(x{row['read_amplification']:.2f}), {row['chips_per_s_per_process']:.0f} chips/s "
                          f"per process", flush=True)  # fmt: skip
        # W = 1, n = 0 speed: more runs, the two mechanisms alternating, so that a change of load on the
        # machine falls on both alike; the median of each.
        for _ in range(args.speed_repeats - 1):
            for name, read_plan in MECHANISMS.items():
                row = next(
                    r for r in rows if r["processes"] == 1 and r["workers"] == 0 and r["mechanism"] == name
                )
                row.setdefault("speeds", [row["chips_per_s_per_process"]])
                row["speeds"].append(run_job(args, dataset, read_plan, 1, 0)[0]["chips_per_s"])
                row["chips_per_s_per_process"] = float(np.median(row["speeds"]))
        growth = []
        if args.growth > 1:
            big, big_bytes = generate(data_root, args.chips * args.growth, args)
            for name, read_plan in MECHANISMS.items():
                small = next(r for r in rows if r["processes"] == 1 and r["workers"] == max(args.workers)
                             and r["mechanism"] == name)  # fmt: skip
                result = run_job(args, big, read_plan, 1, max(args.workers))[0]
                growth.append({"mechanism": name, "workers": max(args.workers),
                               "rss_small": small["peak_rss_mib"], "rss_big": result["peak_rss_mib"],
                               "worker_rss_small": small["worker_peak_rss_mib"],
                               "worker_rss_big": result["worker_peak_rss_mib"],
                               "read_amplification_big": result["bytes_read"] / big_bytes})  # fmt: skip
        quality = shuffle_quality(args, Path(work_dir))

    print(f"\n{args.chips} chips of {args.chip_size_px} px in files of {args.chips_per_file} "
          f"({dataset_bytes / MIB:.1f} MiB of parquet), batch {args.batch_size} per process, "
          f"buffer {args.buffer_batches} batches")  # fmt: skip
    print_table(rows, [
        ("processes", "W", "d"), ("workers", "n", "d"), ("mechanism", "reading", "s"),
        ("metadata_mib", "MiB metadata", ".2f"), ("mib_read", "MiB read", ".1f"),
        ("read_amplification", "x split bytes", ".2f"),
        ("mib_handed_over", "MiB worker->main", ".2f"), ("data_read_amplification", "x split, data only", ".2f"),
        ("records_read", "records read", "d"), ("record_amplification", "x records", ".2f"),
        ("records_used", "used", "d"), ("dropped", "dropped", "d"),
        ("chips_per_s_per_process", "chips/s/process", ".0f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"), ("worker_peak_rss_mib", "worker RSS MiB", ".0f"),
    ])  # fmt: skip
    if growth:
        print(f"\npeak RSS at {args.growth}x the chips (W = 1, n = {max(args.workers)})")
        print_table(growth, [
            ("mechanism", "reading", "s"), ("rss_small", "RSS 1x MiB", ".0f"), ("rss_big", f"RSS {args.growth}x MiB", ".0f"),
            ("worker_rss_small", "worker 1x MiB", ".0f"), ("worker_rss_big", f"worker {args.growth}x MiB", ".0f"),
            ("read_amplification_big", f"x bytes at {args.growth}x", ".2f"),
        ])  # fmt: skip
    print_shuffle_quality(args, quality)
    planned = [r for r in rows if r["mechanism"] == "planned"]
    worst = max(r["read_amplification"] for r in planned)
    worst_data = max(r["data_read_amplification"] for r in planned)
    speed = {
        r["mechanism"]: r["chips_per_s_per_process"]
        for r in rows
        if r["processes"] == 1 and r["workers"] == 0
    }
    print(
        f"\nplanned: worst total read amplification x{worst:.2f}, x{worst_data:.2f} without the workers' "
        f"hand-over to the main process (target <= 1.05); W = 1, n = 0: "
        f"{speed['planned']:.0f} vs {speed['whole stream']:.0f} chips/s; {time.perf_counter() - started:.0f} s"
    )
    machine["load_average_1min_at_end"] = machine_info("cpu")["load_average_1min"]
    write_json(args.json, {
        "benchmark": "stream_scale", "machine": machine,
        "settings": {**vars(args), "json": str(args.json), "data_root": str(args.data_root)},
        "dataset_bytes": dataset_bytes, "rows": rows, "growth": growth, "shuffle_quality": quality,
    })  # fmt: skip


if __name__ == "__main__":
    main()
