"""The self-contained run folder: what was run, with what code and packages, and what it produced.

Layout (see the README): config.yaml, command.txt, env.json, metrics.jsonl, bad_samples.json,
tensorboard/, pictures/, checkpoints/, best/, final/. Only the main process writes here.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

PACKAGES = (
    "sidewalk-hf", "torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "evaluate",
    "huggingface_hub", "safetensors", "numpy", "pillow", "omegaconf",
)  # fmt: skip


def new_run_dir(root: str | Path, name: str) -> Path:
    """``<root>/<UTC timestamp>-<name>``; a second run started in the same second gets a suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(root) / f"{stamp}-{name}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


def _git_state(repo_dir: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment_record(*, seed: int, num_processes: int, mixed_precision: str, device: str) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "git": _git_state(Path(__file__).resolve().parents[2]),
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seed": seed,
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "device": device,
    }


def write_run_description(run_dir: Path, *, config_yaml: str, argv: list[str], environment: dict) -> None:
    """config.yaml, command.txt and env.json: enough to know what ran and to run it again."""
    for sub in ("pictures", "checkpoints"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml)
    (run_dir / "command.txt").write_text(shlex.join(argv) + "\n")
    (run_dir / "env.json").write_text(json.dumps(environment, indent=2) + "\n")


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def truncate_metrics_after(metrics_path: Path, iteration: int) -> int:
    """On resume, drop lines logged after the checkpoint: the resumed run logs them again. Returns how many."""
    if not metrics_path.exists():
        return 0
    kept, dropped = [], 0
    for line in metrics_path.read_text().splitlines():
        if line.strip() and json.loads(line).get("iter", 0) > iteration:
            dropped += 1
        else:
            kept.append(line)
    metrics_path.write_text("".join(f"{line}\n" for line in kept))
    return dropped


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker writing ``metrics.jsonl``: one object per ``accelerator.log`` call.

    Keys of the form ``<split>/<metric>`` (evaluation results) are written as
    ``{"iter", "split", <metric>...}``; other keys as ``{"iter", <key>...}``.
    """

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        plain = {k: v for k, v in values.items() if "/" not in k}
        by_split: dict[str, dict] = {}
        for key, value in values.items():
            if "/" in key:
                split, metric = key.split("/", 1)
                by_split.setdefault(split, {})[metric] = value
        lines = []
        if plain:
            lines.append({"iter": step, **plain})
        lines += [{"iter": step, "split": split, **metrics} for split, metrics in by_split.items()]
        with self.path.open("a") as handle:
            for line in lines:
                handle.write(json.dumps(line) + "\n")
