"""Data: the synthetic aerial sidewalk dataset and the streamed input pipeline.

The names below are imported on first use: the streamed pipeline brings torch, which the parts of the
package that only render or tile scenes (``scene.py``, used by the vector stage) do without.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .parquet_plan import ShardReadError
    from .streaming import (
        BAD_SAMPLE_REASONS,
        BadSample,
        BadSampleError,
        SegmentationStream,
        StreamLoader,
        batch_to_model_inputs,
        join_parts,
        make_dataloader,
        open_split,
    )
    from .synthetic import generate_synthetic_dataset

__all__ = [
    "BAD_SAMPLE_REASONS",
    "BadSample",
    "BadSampleError",
    "SegmentationStream",
    "ShardReadError",
    "StreamLoader",
    "batch_to_model_inputs",
    "generate_synthetic_dataset",
    "join_parts",
    "make_dataloader",
    "open_split",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BAD_SAMPLE_REASONS": ".streaming",
        "BadSample": ".streaming",
        "BadSampleError": ".streaming",
        "SegmentationStream": ".streaming",
        "ShardReadError": ".parquet_plan",
        "StreamLoader": ".streaming",
        "join_parts": ".streaming",
        "batch_to_model_inputs": ".streaming",
        "generate_synthetic_dataset": ".synthetic",
        "make_dataloader": ".streaming",
        "open_split": ".streaming",
    },
)
