"""Experiment trackers: Accelerate's (``TRACKING.LOG_WITH``) beside the run folder's ``metrics.jsonl``.

Every run is named after its run folder. The ids trackers give their runs are kept in ``trackers.json`` in
the run folder, so that ``--resume`` continues the same tracker run where the tracker can (wandb, mlflow,
aim, clearml, comet_ml, trackio, dvclive). Steps that were logged after the checkpoint a run resumes from are
logged again; the JSONL log and TensorBoard drop the old ones, other trackers keep what they keep.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import LoggerType
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .config import ConfigError

logger = logging.getLogger(__name__)

TRACKER_IDS_FILE = "trackers.json"
KNOWN_TRACKERS = sorted(t.value for t in LoggerType if t.value != "all")


def _read_ids(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRACKER_IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _default_init_kwargs(name: str, run_dir: Path, saved: dict[str, Any], resuming: bool) -> dict[str, Any]:
    """What each tracker is given unless the user's ``TRACKING.INIT_KWARGS`` says otherwise."""
    run_name = run_dir.name
    if name == "wandb":
        run_id = saved.get("id") or secrets.token_hex(4)  # wandb's own ids are 8 random characters too
        return {"name": run_name, "dir": str(run_dir), "id": run_id, "resume": "allow"}
    if name == "mlflow":
        return {
            "run_name": run_name,
            **({"run_id": saved["run_id"]} if resuming and "run_id" in saved else {}),
        }
    if name == "aim":
        return {"run_hash": saved["run_hash"]} if resuming and "run_hash" in saved else {}
    if name == "clearml":
        return {
            "task_name": run_name,
            **({"continue_last_task": saved["task_id"]} if "task_id" in saved else {}),
        }
    if name == "comet_ml":
        return {"experiment_key": saved["experiment_key"]} if resuming and "experiment_key" in saved else {}
    if name == "trackio":
        return {"name": run_name, "resume": "allow"}
    if name == "dvclive":
        return {"dir": str(run_dir / "dvclive"), "resume": resuming}
    return {}


def _run_id(name: str, tracker) -> dict[str, Any]:
    """The id that lets a resumed run continue this tracker's run."""
    if name == "wandb":
        return {"id": tracker.run.id}
    if name == "mlflow":
        return {"run_id": tracker.active_run.info.run_id}
    if name == "aim":
        return {"run_hash": tracker.writer.hash}
    if name == "clearml":
        return {"task_id": tracker.task.id}
    if name == "comet_ml":
        return {"experiment_key": tracker.writer.get_key()}
    return {}


def tracker_setup(cfg: DictConfig, run_dir: Path, *, iteration: int, resuming: bool) -> tuple[list, dict]:
    """``(log_with, init_kwargs)`` for ``Accelerator`` and ``init_trackers``.

    TensorBoard writes to ``<run>/tensorboard/`` and, on resume, drops the events after the checkpoint.
    """
    from .run_folder import JsonlTracker

    names = list(dict.fromkeys(str(name) for name in cfg.TRACKING.LOG_WITH))
    unknown = [name for name in names if name not in KNOWN_TRACKERS]
    if unknown:
        raise ConfigError(f"TRACKING.LOG_WITH: unknown tracker(s) {unknown}; valid ones are {KNOWN_TRACKERS}")
    user_kwargs = OmegaConf.to_container(cfg.TRACKING.INIT_KWARGS, resolve=True)
    stray = sorted(set(user_kwargs) - set(names))
    if stray:
        raise ConfigError(
            f"TRACKING.INIT_KWARGS has settings for {stray}, which TRACKING.LOG_WITH does not list"
        )
    saved = _read_ids(run_dir)
    log_with: list = [JsonlTracker(run_dir / "metrics.jsonl")]
    init_kwargs = {}
    for name in names:
        kwargs = {
            **_default_init_kwargs(name, run_dir, saved.get(name, {}), resuming),
            **user_kwargs.get(name, {}),
        }
        if name == "tensorboard":
            if resuming:
                kwargs.setdefault("purge_step", iteration)
            log_with.append(TensorBoardTracker("tensorboard", run_dir, **kwargs))
        else:
            log_with.append(name)
            init_kwargs[name] = kwargs
    return log_with, init_kwargs


def save_tracker_ids(accelerator: Accelerator, run_dir: Path) -> None:
    """Record each tracker's run id in ``trackers.json`` (main process)."""
    if not accelerator.is_main_process:
        return
    ids = _read_ids(run_dir)
    for tracker in accelerator.trackers:
        try:
            found = _run_id(tracker.name, tracker)
        except AttributeError:
            found = {}
        if found:
            ids[tracker.name] = found
    if ids:
        (run_dir / TRACKER_IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n")


def log_images(accelerator: Accelerator, images: dict[str, Image.Image], step: int) -> None:
    """Send pictures to the trackers that take images (tensorboard, wandb, mlflow, aim, clearml)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        for key, image in images.items():
            array = np.asarray(image.convert("RGB"))
            if tracker.name == "tensorboard":
                tracker.writer.add_image(key, array, global_step=step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({key: [image]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(image, key=key.replace("/", "_"), step=step)
            elif tracker.name == "aim":
                tracker.log_images({key: image}, step=step)
            elif tracker.name == "clearml":
                tracker.log_images({key: array}, step=step)
