"""The synthetic aerial sidewalk dataset: layout, determinism and what the chips contain."""

import hashlib
import importlib.util
import io
import itertools
import math
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sidewalk_hf.data.synthetic import generate_synthetic_dataset, render_chip

REPO_ROOT = Path(__file__).resolve().parents[1]


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _all_records(dataset_dir: Path, split: str) -> list[dict]:
    return [
        row
        for path in sorted((dataset_dir / "data").glob(f"{split}-*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def _decode(cell: dict) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(cell["bytes"])))


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path):
    arguments = {"num_train": 6, "num_validation": 2, "num_test": 2, "chip_size_px": 64, "num_shards": 2}
    first = generate_synthetic_dataset(tmp_path / "first", seed=3, **arguments)
    second = generate_synthetic_dataset(tmp_path / "second", seed=3, **arguments)
    other = generate_synthetic_dataset(tmp_path / "other", seed=4, **arguments)

    assert _file_digests(first) == _file_digests(second)
    assert (
        _file_digests(first)["data/train-00000-of-00002.parquet"]
        != _file_digests(other)["data/train-00000-of-00002.parquet"]
    )


def test_layout_is_hub_style_parquet_shards_with_card_and_contact_sheet(synthetic_dataset_dir):
    names = sorted(path.name for path in (synthetic_dataset_dir / "data").iterdir())

    assert names == [
        f"{split}-{i:05d}-of-00004.parquet" for split in ("test", "train", "validation") for i in range(4)
    ]
    assert (synthetic_dataset_dir / "README.md").read_text().startswith("---\n")
    with Image.open(synthetic_dataset_dir / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * 64 and sheet.height >= 64


def test_loads_streaming_with_image_features_and_one_shard_per_file(synthetic_dataset_dir):
    stream = datasets.load_dataset(str(synthetic_dataset_dir), split="train", streaming=True)
    first = next(iter(stream))

    assert isinstance(stream.features["image"], datasets.Image)
    assert isinstance(stream.features["mask"], datasets.Image)
    assert stream.num_shards == 4
    assert first["image"].mode == "RGB" and first["image"].size == (64, 64)
    assert first["mask"].mode == "L" and first["mask"].size == (64, 64)
    assert sum(1 for _ in stream) == 24


def test_loads_without_streaming(synthetic_dataset_dir, tmp_path):
    dataset = datasets.load_dataset(str(synthetic_dataset_dir), split="validation", cache_dir=str(tmp_path))

    assert len(dataset) == 8
    assert set(dataset.column_names) == {"image", "mask", "centerlines"}
    assert isinstance(dataset.features["mask"], datasets.Image)
    assert dataset[0]["image"].size == (64, 64)


def test_mask_values_are_background_sidewalk_or_ignore(synthetic_dataset_dir):
    values = set()
    for split in ("train", "validation", "test"):
        for record in _all_records(synthetic_dataset_dir, split):
            mask = _decode(record["mask"])
            assert mask.ndim == 2
            values |= set(np.unique(mask).tolist())

    assert values <= {0, 1, 255}
    assert {0, 1} <= values


def test_images_are_rgb_jpeg(synthetic_dataset_dir):
    record = _all_records(synthetic_dataset_dir, "test")[0]

    with Image.open(io.BytesIO(record["image"]["bytes"])) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
    with Image.open(io.BytesIO(record["mask"]["bytes"])) as mask:
        assert mask.format == "PNG" and mask.mode == "L"


def test_sidewalks_cover_five_to_fifteen_percent_of_a_chip_on_average(synthetic_dataset_dir):
    shares = [
        float((_decode(record["mask"]) == 1).mean())
        for split in ("train", "validation", "test")
        for record in _all_records(synthetic_dataset_dir, split)
    ]

    assert 0.05 <= np.mean(shares) <= 0.15


def test_centerlines_lie_on_sidewalk_pixels(synthetic_dataset_dir):
    on_sidewalk = total = 0
    for record in _all_records(synthetic_dataset_dir, "train"):
        mask = _decode(record["mask"])
        for polyline in record["centerlines"]:
            for (x0, y0), (x1, y1) in itertools.pairwise(polyline):
                for t in np.linspace(0, 1, max(2, int(2 * math.dist((x0, y0), (x1, y1))))):
                    col = min(int(x0 + t * (x1 - x0)), mask.shape[1] - 1)
                    row = min(int(y0 + t * (y1 - y0)), mask.shape[0] - 1)
                    on_sidewalk += mask[row, col] == 1
                    total += 1

    assert total > 500
    assert on_sidewalk / total >= 0.95


def test_tree_canopies_hide_the_configured_share_of_sidewalk_pixels():
    def hidden_share(fraction: float) -> float:
        chips = [render_chip(np.random.default_rng([1, i]), 96, fraction) for i in range(30)]
        return sum(c.hidden_sidewalk_px for c in chips) / sum(c.sidewalk_px for c in chips)

    assert hidden_share(0.0) == 0.0
    assert 0.05 <= hidden_share(0.07) <= 0.10
    assert hidden_share(0.15) > hidden_share(0.07)


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="existing"):
        generate_synthetic_dataset(tmp_path / "existing", 1, 1, 1, chip_size_px=64)
    assert (tmp_path / "existing" / "keep.txt").read_text() == "mine"


def test_command_line_writes_the_dataset(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_dataset", REPO_ROOT / "scripts" / "make_synthetic_dataset.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    script.main(
        [
            "--out",
            str(tmp_path / "cli"),
            "--train",
            "3",
            "--validation",
            "1",
            "--test",
            "0",
            "--size",
            "64",
            "--num-shards",
            "2",
        ]
    )

    assert sorted(p.name for p in (tmp_path / "cli" / "data").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ]
