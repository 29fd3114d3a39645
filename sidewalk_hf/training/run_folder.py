"""The self-contained run folder: what was run, with what code and packages, and what it produced.

Layout (see the README): config.yaml, command.txt, env.json, log.txt, metrics.jsonl, bad_samples.json,
trackers.json, tensorboard/, pictures/, checkpoints/, best/, final/. The main process writes here, except each
other process's log_process<N>.txt and checkpoint shard; so every node must see the folder (a shared file
system), which ``share_run_dir`` checks when the run starts.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import broadcast_object_list, gather_object

PACKAGES = (
    "sidewalk-hf",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "accelerate",
    "datasets",
    "evaluate",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "pillow",
    "omegaconf",
)
# Written by the main process into a new run folder, looked for by every other process.
_SHARED_CHECK_FILE = ".shared-check"


def new_run_dir(root: str | Path, name: str) -> Path:
    """``<root>/<UTC timestamp>-<name>``; a second run started in the same second gets a suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(root) / f"{stamp}-{name}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


class RunFolderNotSharedError(RuntimeError):
    """A process cannot see the run folder the main process created (it is not on a shared file system)."""


def share_run_dir(run_dir: Path | None, root: str | Path, name: str, state: PartialState) -> Path:
    """The run folder every process uses: ``run_dir`` when resuming (each process was given it), else a new
    one named on the main process.

    The main process creates it and writes a marker file; every process must then find that marker, or the
    run stops at once naming the processes (and hosts) that cannot, rather than at the first checkpoint.
    Collective.
    """
    new_name, token = None, None
    if state.is_main_process:
        if run_dir is None:
            new_name = new_run_dir(root, name).absolute()
        run_folder = Path(run_dir) if run_dir is not None else new_name
        run_folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        (run_folder / _SHARED_CHECK_FILE).write_text(token)
    new_name, token = broadcast_object_list([new_name, token])
    run_dir = Path(run_dir) if run_dir is not None else Path(new_name)
    check_run_folder_is_shared(run_dir, token, state)
    return run_dir


def check_run_folder_is_shared(run_dir: Path, token: str, state: PartialState, wait_s: float = 5.0) -> None:
    """Every process looks for the main process's marker in ``run_dir`` (waiting up to ``wait_s`` for a
    network file system to show it); all of them raise ``RunFolderNotSharedError`` if any does not see it."""
    marker = run_dir / _SHARED_CHECK_FILE
    deadline = time.monotonic() + wait_s
    while True:
        seen = marker.is_file() and marker.read_text() == token
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    views = gather_object([(state.process_index, platform.node(), seen)])
    state.wait_for_everyone()
    if state.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [f"process {index} on {host}" for index, host, saw in views if not saw]
    if blind:
        raise RunFolderNotSharedError(
            f"the run folder {run_dir} is not visible to {', '.join(blind)}: every node must see it at the same "
            "path (a shared file system such as NFS or Lustre; see docs/architecture.md, multi-node training). "
            "Set OUTPUT.ROOT to a shared folder"
        )


def _git_state(repo_dir: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    # Only this project's own checkout counts: an installed package may sit inside someone else's repository.
    if not (repo_dir / ".git").exists() or not (repo_dir / "sidewalk_hf").is_dir():
        return {"commit": None, "dirty": None}
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def code_record() -> dict[str, Any]:
    """Which sidewalk_hf ran: the git commit of a source checkout, else the installed version."""
    package_dir = Path(__file__).resolve().parents[1]
    try:
        version = metadata.version("sidewalk-hf")
    except metadata.PackageNotFoundError:
        version = None
    return {**_git_state(package_dir.parent), "version": version, "package_dir": str(package_dir)}


def environment_record(*, seed: int, num_processes: int, mixed_precision: str, device: str) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "git": code_record(),
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
