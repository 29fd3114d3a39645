"""The loop's own state, the part of a restart that Accelerate cannot save: saved and restored as one object."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# How many bad-sample examples a checkpoint and bad_samples.json keep.
MAX_BAD_SAMPLE_EXAMPLES = 100


@dataclass
class TrainState:
    """Where training is and what it has seen.

    ``steps_done_in_epoch`` counts the batches consumed in the current pass over the data (DataLoader
    workers read ahead, so the stream's own position cannot be used); with ``epoch`` it is the stream
    position a resumed run starts from. ``best`` holds the best validation metrics and their iteration.
    """

    iteration: int = 0
    epoch: int = 0
    steps_done_in_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"mean_iou": -1.0, "iteration": None})
    bad_samples: Counter = field(default_factory=Counter)
    bad_sample_examples: list[dict[str, Any]] = field(default_factory=list)
    dropped_remainder: int = 0

    def stream_position(self) -> dict[str, int]:
        """The data stream's state (``SegmentationStream.load_state_dict``), saved once per process."""
        return {"epoch": self.epoch, "start_step": self.steps_done_in_epoch}

    def trainer_record(self) -> dict[str, Any]:
        """What the main process saves (``trainer_state.json``; the checkpoint adds the iteration)."""
        return {
            "best": self.best,
            "bad_samples": dict(self.bad_samples),
            "bad_sample_examples": self.bad_sample_examples[:MAX_BAD_SAMPLE_EXAMPLES],
            "dropped_remainder": self.dropped_remainder,
        }

    @classmethod
    def restore(cls, trainer_record: dict[str, Any], stream_position: dict[str, int]) -> TrainState:
        return cls(
            iteration=trainer_record["iteration"],
            epoch=stream_position["epoch"],
            steps_done_in_epoch=stream_position["start_step"],
            best=trainer_record["best"],
            bad_samples=Counter(trainer_record["bad_samples"]),
            bad_sample_examples=list(trainer_record["bad_sample_examples"]),
            dropped_remainder=trainer_record["dropped_remainder"],
        )

    def bad_samples_report(self) -> dict[str, Any]:
        """The content of the run folder's ``bad_samples.json``."""
        return {
            "counts": dict(self.bad_samples),
            "examples": self.bad_sample_examples[:MAX_BAD_SAMPLE_EXAMPLES],
            "dropped_remainder_samples": self.dropped_remainder,
        }

    def count_bad_samples(self, batch: dict) -> None:
        for reason, index, key in batch.get("bad_samples", []):
            self.bad_samples[reason] += 1
            self.bad_sample_examples.append({"reason": reason, "record_index": int(index), "key": str(key)})

    def end_epoch(self, dropped_remainder_records: int) -> None:
        self.dropped_remainder += dropped_remainder_records
        self.epoch, self.steps_done_in_epoch = self.epoch + 1, 0
