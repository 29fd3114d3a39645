"""Shared test set-up: no network, tiny models, generated data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset, generated once per test session: 24 train, 8 validation and 8 test chips
    of 64 px, 4 parquet shards per split (well under a second)."""
    from sidewalk_hf.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "dataset",
        num_train=24,
        num_validation=8,
        num_test=8,
        chip_size_px=64,
        seed=0,
        num_shards=4,
    )
