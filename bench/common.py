"""What the benchmarks in this folder share: the machine description, interleaved timing, tables, JSON.

Timings are taken round-robin across the contenders (one repeat of each in turn, then the next repeat), so a
slow drift of the machine hits every contender alike; the median of the repeats is reported, after warm-up
calls that are not timed. On a CPU shared with other work a single busy neighbour can slow a multi-threaded
call several times over, so each CPU timing also records how many cores other processes used meanwhile, and
a disturbed timing is retaken once the machine is quiet again.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Other processes may use this many CPU cores beyond those our threads leave free, on average during a CPU
# timing, before it is retaken.
FOREIGN_LIMIT_CORES = 0.25


def foreign_limit_cores() -> float:
    """Cores other processes may use without taking any from our threads (plus a small allowance)."""
    return max(0, (os.cpu_count() or 1) - torch.get_num_threads()) + FOREIGN_LIMIT_CORES


def cpu_model_name() -> str:
    """The processor's marketing name as `lscpu` prints it ("Model name"), or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Everything needed to compare figures taken on different machines, and the load while they ran."""
    device = torch.device(device)
    info = {
        "cpu_model": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict) -> str:
    text = f"{info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch {info['torch_threads']} threads"
    if "gpu" in info:
        text = f"{info['gpu']} (CUDA {info['cuda']}); host {text}"
    return f"{text}, load average {info['load_average_1min']} at start"


def set_up_device(parser, args) -> torch.device:
    """The device of `--device`, torch's thread count from `--threads`, cuDNN autotuning on GPUs."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, time stolen by the hypervisor included."""
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def foreign_cores_while(call: Callable[[], object]) -> tuple[float, float]:
    """Run `call`; return its wall-clock seconds and the CPU cores other processes used meanwhile, on average."""
    busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    foreign = (busy_cpu_seconds() - busy) - (time.process_time() - own)
    return seconds, max(foreign, 0.0) / seconds


def wait_until_quiet(limit_cores: float, max_wait_s: float) -> float:
    """Sleep until other processes use under `limit_cores` cores over a second, or `max_wait_s` have passed.

    Returns the seconds waited.
    """
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        if psutil.cpu_percent(interval=1.0) / 100 * (os.cpu_count() or 1) < limit_cores:
            break
    return time.monotonic() - start


@dataclass
class Timings:
    """Seconds per timed call of each contender, and the load other processes put on the CPU meanwhile."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    foreign_cores: dict[str, list[float]] = field(default_factory=dict)
    retried: int = 0
    still_loaded: int = 0

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def interleaved_seconds(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    attempts: int = 4,
    wait_budget_s: float = 300,
) -> Timings:
    """Wall-clock seconds of each call per repeat, the calls taken in turn; `warmup` rounds are not timed.

    On a CPU, a timing during which other processes took cores our threads needed (`foreign_limit_cores`) is
    thrown away: the benchmark waits until the machine is quiet (at most a minute) and times the call
    again, up to `attempts` times and `wait_budget_s` seconds of waiting in all; then the least disturbed
    timing is kept and counted in `still_loaded`.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    synchronize(device)
    limit_cores = foreign_limit_cores()
    timings = Timings({name: [] for name in calls}, {name: [] for name in calls})

    def timed(call):
        synchronize(device)
        return foreign_cores_while(lambda: (call(), synchronize(device)))

    for _ in range(repeats):
        for name, call in calls.items():
            seconds, foreign = timed(call)
            tries = [(foreign, seconds)]
            while (
                device.type == "cpu" and foreign > limit_cores and len(tries) < attempts and wait_budget_s > 0
            ):
                timings.retried += 1
                print(
                    f"    {name}: other processes used {foreign:.1f} cores; waiting to time it again",
                    flush=True,
                )
                wait_budget_s -= wait_until_quiet(limit_cores, max_wait_s=min(60, wait_budget_s))
                seconds, foreign = timed(call)
                tries.append((foreign, seconds))
            foreign, seconds = min(tries)
            if device.type == "cpu" and foreign > limit_cores:
                timings.still_loaded += 1
            timings.seconds[name].append(seconds)
            timings.foreign_cores[name].append(round(foreign, 3))
    return timings


def describe_disturbance(timings: Timings) -> str:
    kept = sum(len(values) for values in timings.seconds.values())
    return (
        f"{kept} timings kept; {timings.retried} retaken because other processes loaded the CPU, "
        f"{timings.still_loaded} kept although still loaded (> {foreign_limit_cores():.2f} cores)"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Rows as a fixed-width table; `columns` are (key, header, format spec), missing values print as '-'."""
    cells = [
        [format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns]
        for row in rows
    ]
    widths = [max(len(header), *(len(line[i]) for line in cells)) for i, (_, header, _) in enumerate(columns)]
    print("  ".join(header.ljust(width) for (_, header, _), width in zip(columns, widths)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
