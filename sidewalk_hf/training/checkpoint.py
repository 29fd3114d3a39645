"""Complete training states in ``checkpoints/iter_XXXXXXX/``, written atomically, the last K kept.

A checkpoint holds what Accelerate saves (model, optimizer, the registered LR scheduler, per-process RNG
states, the AMP scaler) plus what Accelerate cannot know: one data-stream position file per process and
the loop's own counters. Everything is first written to ``.tmp-iter_XXXXXXX`` and renamed when every
process has finished, so a run killed mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .run_folder import write_json_atomic
from .state import TrainState

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d{7,})$")
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_iteration(checkpoint_dir: Path) -> int:
    """The iteration a checkpoint folder was written at, from its name."""
    return int(CHECKPOINT_PATTERN.match(Path(checkpoint_dir).name).group(1))


def _stream_state_file(process_index: int) -> str:
    return f"stream_state_rank{process_index}.json"


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are not listed)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: Path,
    iteration: int,
    *,
    trainer_state: dict[str, Any],
    stream_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every process must call it at the same iteration."""
    final_dir = checkpoints_dir / checkpoint_name(iteration)
    tmp_dir = checkpoints_dir / f".tmp-{checkpoint_name(iteration)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_dir))
    (tmp_dir / _stream_state_file(accelerator.process_index)).write_text(json.dumps(stream_state))
    if accelerator.is_main_process:
        state = {**trainer_state, "iteration": iteration, "num_processes": accelerator.num_processes}
        (tmp_dir / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp_dir.rename(final_dir)
        for old in complete_checkpoints(checkpoints_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final_dir


def load_checkpoint(accelerator: Accelerator, checkpoint_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore what ``save_checkpoint`` wrote; returns (trainer state, this process's stream state)."""
    trainer_state = json.loads((checkpoint_dir / TRAINER_STATE_FILE).read_text())
    saved_processes = trainer_state["num_processes"]
    if saved_processes != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint_dir} was written by {saved_processes} processes; resuming it exactly needs the "
            f"same number, got {accelerator.num_processes}"
        )
    accelerator.load_state(str(checkpoint_dir))
    stream_state = json.loads((checkpoint_dir / _stream_state_file(accelerator.process_index)).read_text())
    return trainer_state, stream_state


def save_training_state(accelerator: Accelerator, run_dir: Path, state: TrainState, keep_last: int) -> Path:
    """Checkpoint ``state`` with the Accelerate state under ``run_dir/checkpoints`` and refresh the run
    folder's ``bad_samples.json`` (collective)."""
    checkpoint = save_checkpoint(
        accelerator,
        run_dir / "checkpoints",
        state.iteration,
        trainer_state=state.trainer_record(),
        stream_state=state.stream_position(),
        keep_last=keep_last,
    )
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "bad_samples.json", state.bad_samples_report())
    return checkpoint


def restore_training_state(accelerator: Accelerator, run_dir: Path) -> tuple[TrainState, Path]:
    """The state of the newest complete checkpoint, with the Accelerate state loaded (collective)."""
    latest = complete_checkpoints(run_dir / "checkpoints")[-1]
    trainer_record, stream_position = load_checkpoint(accelerator, latest)
    return TrainState.restore(trainer_record, stream_position), latest
