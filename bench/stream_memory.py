"""Streaming memory: peak RSS of a training run does not grow with the size of the dataset.

    python bench/stream_memory.py                            # demo config, 100 iterations, 400 and 4000 chips
    python bench/stream_memory.py --iters 200 --factors 1 10 30 --num-workers 2
    python bench/stream_memory.py --config base.yaml --chip-size-px 256 --batch-size 8 --device cuda

For each factor, a synthetic dataset of `--chips` x factor training chips is generated (kept under
`--data-root` when given, so later runs reuse it) and `accelerate launch scripts/train.py` trains
`--iters` iterations on it, with periodic evaluation and checkpoints pushed beyond the end of the run. The
whole process tree (the launcher, the training process, its DataLoader workers) is polled every
`--poll-s` seconds with psutil; the table shows the peak of the tree's summed RSS, the same for PSS (which
counts pages shared between forked workers once), and the peaks of the training process and of its
workers. With the defaults the 1x run passes over its data several times and the 10x run less than once,
so a pipeline that kept what it had read would show here.

Before a run counts, it must finish with exit status 0 and log `--iters` iterations of finite loss in its
`metrics.jsonl`. `--repeats` runs per factor give the median of each peak. The verdict is flat when the
largest factor's peak tree RSS is within `--tolerance` of the smallest factor's. Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import RESULTS_DIR, describe_machine, machine_info, median, print_table, write_json

from sidewalk_hf.data.synthetic import generate_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def dataset_for(root: Path, num_train: int, args) -> Path:
    """The synthetic dataset with `num_train` training chips under `root`, generated once."""
    folder = root / f"synthetic-{num_train}x{args.chip_size_px}px-seed{args.seed}"
    if not (folder / "README.md").exists():
        print(f"  generating {num_train} training chips in {folder}", flush=True)
        generate_synthetic_dataset(
            folder,
            num_train=num_train,
            num_validation=args.eval_chips,
            num_test=args.eval_chips,
            chip_size_px=args.chip_size_px,
            seed=args.seed,
            num_shards=args.num_shards,
        )
    return folder


def training_command(args, dataset: Path, runs_root: Path) -> list[str]:
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        args.mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if args.device == "cpu":
        launcher.append("--cpu")
    opts = [
        "DATASET.SOURCE",
        str(dataset),
        "DATASET.SYNTHETIC.GENERATE_IF_MISSING",
        "false",
        "SOLVER.MAX_ITER",
        str(args.iters),
        "TEST.EVAL_PERIOD",
        "1000000000",
        "CHECKPOINT.PERIOD",
        "1000000000",
        "OUTPUT.ROOT",
        str(runs_root),
        "OUTPUT.NAME",
        "stream-memory",
        "OUTPUT.LOG_PERIOD",
        "1",
        *args.opts,
    ]
    flags = []
    if args.batch_size:
        flags += ["--batch_size", str(args.batch_size)]
    if args.num_workers is not None:
        flags += ["--num_workers", str(args.num_workers)]
    return [
        *launcher,
        str(REPO_ROOT / "scripts" / "train.py"),
        "--config",
        args.config,
        *flags,
        "--opts",
        *opts,
    ]


class TreeMemory:
    """Peaks of the memory of a process and all its descendants, sampled by `sample()`."""

    def __init__(self, root_pid: int):
        self.root = psutil.Process(root_pid)
        self.peaks = {"tree_rss": 0, "tree_pss": 0, "trainer_rss": 0, "workers_rss": 0}
        self.max_processes = 0

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss, pss, by_pid = 0, 0, {}
        for process in tree:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            by_pid[process.pid] = (process, info.rss)
        trainer_pids = [pid for pid, (process, _) in by_pid.items() if self._is_trainer(process)]
        trainer_rss = sum(by_pid[pid][1] for pid in trainer_pids)
        workers_rss = sum(
            value for pid, (process, value) in by_pid.items() if self._parent_pid(process) in trainer_pids
        )
        self.max_processes = max(self.max_processes, len(by_pid))
        for key, value in (
            ("tree_rss", rss),
            ("tree_pss", pss),
            ("trainer_rss", trainer_rss),
            ("workers_rss", workers_rss),
        ):
            self.peaks[key] = max(self.peaks[key], value)

    @staticmethod
    def _parent_pid(process: psutil.Process) -> int | None:
        try:
            return process.ppid()
        except psutil.NoSuchProcess:
            return None

    def _is_trainer(self, process: psutil.Process) -> bool:
        """The process running scripts/train.py itself: a direct child of the launcher."""
        return self._parent_pid(process) == self.root.pid


def logged_training(runs_root: Path) -> list[dict]:
    metrics = sorted(runs_root.glob("*/metrics.jsonl"))
    if len(metrics) != 1:
        raise RuntimeError(f"expected one run folder with metrics.jsonl under {runs_root}, found {metrics}")
    lines = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
    return [line for line in lines if "loss" in line]


def one_run(args, dataset: Path, work_dir: Path, label: str) -> dict:
    runs_root = work_dir / f"runs-{label}"
    command = training_command(args, dataset, runs_root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    log_path = work_dir / f"{label}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        memory = TreeMemory(process.pid)
        while process.poll() is None:
            memory.sample()
            time.sleep(args.poll_s)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"training on {dataset} exited with status {process.returncode}:\n{tail}")
    training = logged_training(runs_root)
    logged_iters = {line["iter"] for line in training}
    if len(logged_iters) < args.iters or not all(math.isfinite(line["loss"]) for line in training):
        raise RuntimeError(
            f"run {runs_root} logged {len(logged_iters)} of {args.iters} iterations, or a non-finite loss; "
            f"see {log_path}"
        )
    last_iter = max(logged_iters)
    return {
        **{f"peak_{key}_mib": value / MIB for key, value in memory.peaks.items()},
        "max_processes": memory.max_processes,
        "seconds": seconds,
        "last_logged_iter": last_iter,
        "last_loss": training[-1]["loss"],
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo.yaml", help="training config (name in configs/ or a path)")
    parser.add_argument("--iters", type=int, default=100, help="training iterations per run")
    parser.add_argument("--chips", type=int, default=400, help="training chips at factor 1")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10], help="dataset size multiples")
    parser.add_argument("--chip-size-px", type=int, default=128, help="generated chip size (demo: 128)")
    parser.add_argument("--eval-chips", type=int, default=16, help="validation and test chips")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (config's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="the launcher's"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per factor; peaks are medians")
    parser.add_argument("--poll-s", type=float, default=0.1, help="seconds between memory samples")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth of peak tree RSS")
    parser.add_argument("--data-root", type=Path, default=None, help="keep generated datasets here")
    parser.add_argument("--opts", nargs="+", default=[], help="further KEY VALUE config overrides")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "stream_memory.json")
    args = parser.parse_args()

    machine = machine_info(args.device)
    print(f"machine: {describe_machine(machine)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sidewalk-stream-memory-") as work_dir:
        work_dir = Path(work_dir)
        data_root = args.data_root or work_dir / "data"
        for factor in sorted(args.factors):
            num_train = args.chips * factor
            dataset = dataset_for(data_root, num_train, args)
            runs = []
            for repeat in range(args.repeats):
                print(
                    f"  training {args.iters} iterations on {num_train} chips (run {repeat + 1})", flush=True
                )
                runs.append(one_run(args, dataset, work_dir, f"x{factor}-{repeat}"))
            peak_keys = [key for key in runs[0] if key.startswith("peak_")]
            rows.append(
                {
                    "factor": factor,
                    "train_chips": num_train,
                    **{key: median([run[key] for run in runs]) for key in peak_keys},
                    "max_processes": max(run["max_processes"] for run in runs),
                    "seconds": median([run["seconds"] for run in runs]),
                    "runs": runs,
                }
            )

    growth = rows[-1]["peak_tree_rss_mib"] / rows[0]["peak_tree_rss_mib"] - 1
    flat = growth <= args.tolerance
    print(f"\n{args.config}, {args.iters} iterations, {args.chip_size_px}-px chips")
    print_table(
        rows,
        [
            ("factor", "dataset", "d"),
            ("train_chips", "train chips", "d"),
            ("peak_tree_rss_mib", "peak tree RSS MiB", ".0f"),
            ("peak_tree_pss_mib", "peak tree PSS MiB", ".0f"),
            ("peak_trainer_rss_mib", "trainer RSS MiB", ".0f"),
            ("peak_workers_rss_mib", "workers RSS MiB", ".0f"),
            ("max_processes", "processes", "d"),
            ("seconds", "run s", ".0f"),
        ],
    )
    verdict = "flat" if flat else "GROWS"
    print(
        f"\npeak tree RSS at {rows[-1]['factor']}x vs {rows[0]['factor']}x: {growth:+.1%} "
        f"(tolerance {args.tolerance:.0%}): {verdict}"
    )
    machine["load_average_1min_at_end"] = machine_info(args.device)["load_average_1min"]
    write_json(
        args.json,
        {
            "benchmark": "stream_memory",
            "machine": machine,
            "settings": {**vars(args), "json": str(args.json), "data_root": str(args.data_root)},
            "rows": rows,
            "growth": growth,
            "flat": flat,
        },
    )


if __name__ == "__main__":
    main()
