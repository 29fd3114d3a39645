"""Segmentation metrics (mean IoU, per-class IoU, pixel accuracy; see docs/architecture.md): the shipped `sidewalk_iou` evaluate module and a loop-side wrapper.

`SegmentationMetricAccumulator` is what training and evaluation loops use: each process counts its own batches
into a confusion matrix on its device, and `compute(accelerator)` sums the matrices across processes once, so
every sample counts exactly once and no collective runs per batch. `load_sidewalk_iou()` gives the same metric
through `evaluate.load`, for code written against evaluate's `mean_iou`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import evaluate
import numpy as np
import torch

from .sidewalk_iou.sidewalk_iou import SidewalkIoU

__all__ = [
    "SegmentationMetricAccumulator",
    "SidewalkIoU",
    "load_sidewalk_iou",
    "reported_metric_keys",
    "sidewalk_iou_path",
]


def reported_metric_keys(id2label: dict[int, str]) -> list[str]:
    """The metrics a run reports, in order: ``mean_iou``, ``<label>_iou`` for each class of ``id2label``
    (``background_iou``, ``sidewalk_iou`` with the default labels), ``pixel_accuracy``.

    The one list behind the training log, validation, the final evaluation, ``scripts/evaluate.py``, the
    model card and the training curves, so that renamed classes are reported under their names.
    """
    names = [str(id2label[index]) for index in sorted(id2label, key=int)]
    return ["mean_iou", *(f"{name}_iou" for name in names), "pixel_accuracy"]


def sidewalk_iou_path() -> str:
    """Path of the shipped evaluate module script, for `evaluate.load(path)`."""
    return str(resources.files(__package__) / "sidewalk_iou" / "sidewalk_iou.py")


def load_sidewalk_iou(**init_kwargs: Any) -> evaluate.EvaluationModule:
    """`evaluate.load` of the shipped module: works offline, since the script is read from the package.

    `init_kwargs` go to `evaluate.load` and the module (`num_labels=2, ignore_index=255, device=...`,
    `experiment_id=...`). evaluate copies the script into its modules cache (`HF_MODULES_CACHE`), which must be
    writable.
    """
    return evaluate.load(sidewalk_iou_path(), **init_kwargs)


class SegmentationMetricAccumulator:
    """Confusion-matrix metrics for a loop over batches: `update` per batch, `compute(accelerator)` once.

    Args:
        num_labels: number of classes.
        ignore_index: label value that is left out (padding masks made of it add nothing).
        id2label: class names for the named results (`background_iou`, `sidewalk_iou`); defaults to the
            background and sidewalk for two classes.
        device: where the counts live; batches are moved there.

    `compute` returns plain Python values (floats, lists of floats, a nested list for the confusion matrix),
    ready for JSON and loggers; NaN marks a class absent from both predictions and labels.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        *,
        id2label: dict[int, str] | None = None,
        device: torch.device | str | None = None,
    ):
        self.metric = SidewalkIoU(
            num_labels=num_labels, ignore_index=ignore_index, id2label=id2label, device=device
        )
        self.num_labels = num_labels

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch: `predictions` are class ids (B, H, W) or logits (B, num_labels, H, W); `labels` (B, H, W)."""
        if predictions.is_floating_point():
            if predictions.dim() != 4 or predictions.shape[1] != self.num_labels:
                raise ValueError(
                    f"floating-point predictions are taken as logits of shape (batch, {self.num_labels}, height, "
                    f"width); got shape {tuple(predictions.shape)}"
                )
            predictions = predictions.argmax(dim=1)
        self.metric.add_batch(predictions=predictions, references=labels)

    def compute(self, accelerator=None) -> dict[str, Any]:
        """Metrics of everything counted since the last `compute`, summed over processes when `accelerator` is
        given (collective: every process must call it); the counts are then reset."""
        results = self.metric.compute(accelerator=accelerator)
        return {key: _to_python(value) for key, value in results.items()}

    def reset(self) -> None:
        self.metric.reset()

    def __len__(self) -> int:
        """Maps counted on this process since the last `compute`."""
        return len(self.metric)


def _to_python(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
