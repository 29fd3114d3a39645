"""Data: the synthetic aerial sidewalk dataset and the streamed input pipeline."""

from .parquet_plan import ShardReadError
from .streaming import (
    BAD_SAMPLE_REASONS,
    BadSample,
    BadSampleError,
    SegmentationStream,
    batch_to_model_inputs,
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
    "batch_to_model_inputs",
    "generate_synthetic_dataset",
    "make_dataloader",
    "open_split",
]
