"""The streamed input pipeline: batches, sharding across processes and workers, shuffling, resuming,
bad samples."""

import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Features, Image
from PIL import Image as PILImage

from sidewalk_hf.data import BadSample, SegmentationStream, batch_to_model_inputs, make_dataloader, open_split
from sidewalk_hf.data.transforms import ColorJitter, Normalizer, augmentation_generator, draw_augmentation

IMAGENET = {
    "image_mean": [123.675, 116.28, 103.53],
    "image_std": [58.395, 57.12, 57.375],
    "rescale_factor": 1.0,
}
IDENTITY = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "rescale_factor": 1.0}
NO_AUGMENTATION = {"scale_range": (1.0, 1.0), "flips": False, "color_jitter": 0.0}


# ---- datasets the tests write themselves ------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_split(root: Path, split: str, rows: list[dict], num_shards: int, features: Features) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), num_shards + 1).round().astype(int)
    for shard, (start, stop) in enumerate(itertools.pairwise(bounds)):
        table = pa.Table.from_pylist(rows[start:stop], schema=features.arrow_schema)
        pq.write_table(table, root / "data" / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet")


def _indexed_record(index: int) -> dict:
    """An 8x8 chip whose pixels spell its index (red = index % 256, green = index // 256), losslessly."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = index % 256, index // 256, 7
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 1
    return {
        "image": {"bytes": _png(image), "path": f"chip-{index}.png"},
        "mask": {"bytes": _png(mask), "path": None},
    }


def _write_indexed_dataset(root: Path, num_records: int, num_shards: int = 4, split: str = "train") -> Path:
    features = Features({"image": Image(), "mask": Image()})
    _write_split(root, split, [_indexed_record(i) for i in range(num_records)], num_shards, features)
    return root


def _indices(batch: dict) -> list[int]:
    """Record identities of a batch from an indexed dataset read with IDENTITY normalisation."""
    pixels = batch["pixel_values"][:, :, 0, 0].long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def _assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        for key in ("pixel_values", "labels", "pixel_normalization"):
            assert torch.equal(want[key], got[key]), key
        assert torch.equal(want["record_index"], got["record_index"])
        assert want["bad_samples"] == got["bad_samples"]


# ---- opening a dataset ------------------------------------------------------------------------------------


def test_a_dataset_without_image_and_mask_columns_is_refused_with_its_columns_listed(tmp_path):
    features = Features({"image": Image(), "label": Image()})
    row = {"image": {"bytes": _png(np.zeros((4, 4, 3), np.uint8)), "path": None},
           "label": {"bytes": _png(np.zeros((4, 4), np.uint8)), "path": None}}  # fmt: skip
    _write_split(tmp_path, "train", [row], 1, features)

    with pytest.raises(ValueError, match=r"no 'mask' column: its columns are \['image', 'label'\]"):
        open_split(tmp_path, "train")
    with pytest.raises(ValueError, match="'label'"):
        SegmentationStream(tmp_path, "train", per_process_batch_size=1, training=True, **IMAGENET)


# ---- what a batch is --------------------------------------------------------------------------------------


def test_training_batches_are_uint8_crops_and_labels_with_per_sample_normalisation(synthetic_dataset_dir):
    stream = SegmentationStream(
        synthetic_dataset_dir, "train", per_process_batch_size=4, training=True, crop_size_px=48,
        scale_range=(0.5, 1.5), **IMAGENET,
    )  # fmt: skip

    batches = list(make_dataloader(stream))

    assert len(batches) == stream.steps_per_pass == (24 - stream.dropped_remainder_records) // 4 >= 4
    for batch in batches:
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (4, 3, 48, 48)
        assert batch["labels"].dtype == torch.uint8 and batch["labels"].shape == (4, 48, 48)
        assert batch["pixel_normalization"].dtype == torch.float32
        assert batch["pixel_normalization"].shape == (4, 3, 3)  # (scale, grey scale, offset) x bands
        assert batch["record_index"].dtype == torch.int64 and batch["record_index"].shape == (4,)
        assert batch["bad_samples"] == []
        assert set(batch["labels"].unique().tolist()) <= {0, 1, 255}
        pixel_values, labels = batch_to_model_inputs(batch, "cpu")
        assert pixel_values.dtype == torch.float32 and pixel_values.shape == (4, 3, 48, 48)
        assert labels.dtype == torch.int64 and torch.equal(labels, batch["labels"].long())
    inputs = torch.cat([batch_to_model_inputs(b, "cpu")[0] for b in batches])
    assert -3 < float(inputs.mean()) < 3


def test_model_inputs_are_the_jittered_normalised_chips_and_fillers_are_zero(dataset_with_bad_samples):
    """``batch_to_model_inputs`` gives what the stream gave before it handed over uint8 batches: each
    chip jittered by its own draw (torchvision's brightness, contrast, saturation, grey = band mean) and
    normalised, here recomputed step by step in float64; bad samples 0 with labels 255."""
    options = {"crop_size_px": 12, "scale_range": (0.8, 1.3), "flips": True, "color_jitter": 0.3, "seed": 5}
    stream = SegmentationStream(
        dataset_with_bad_samples, "train", per_process_batch_size=4, training=True, **options, **IMAGENET
    )
    stream.set_epoch(1)
    mean = torch.tensor(IMAGENET["image_mean"], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET["image_std"], dtype=torch.float64).view(3, 1, 1)

    batches = list(make_dataloader(stream, num_workers=2))

    fillers = 0
    for batch in batches:
        bad = {b.record_index for b in batch["bad_samples"]}
        for memory_format in (torch.contiguous_format, torch.channels_last):
            pixel_values, labels = batch_to_model_inputs(batch, "cpu", memory_format)
            assert pixel_values.is_contiguous(memory_format=memory_format)
            for slot, record_index in enumerate(batch["record_index"].tolist()):
                if record_index in bad:
                    fillers += 1
                    assert torch.equal(pixel_values[slot], torch.zeros(3, 12, 12))
                    assert (labels[slot] == 255).all()
                    continue
                jitter = draw_augmentation(
                    augmentation_generator(5, 1, record_index), 16, 16, crop_size_hw=(12, 12),
                    scale_range=options["scale_range"], color_jitter=0.3,
                ).jitter  # fmt: skip
                x = batch["pixel_values"][slot].double() * jitter.brightness
                x = jitter.contrast * x + (1 - jitter.contrast) * x.mean()
                x = jitter.saturation * x + (1 - jitter.saturation) * x.mean(0, keepdim=True)
                expected = ((x * IMAGENET["rescale_factor"] - mean) / std).float()
                torch.testing.assert_close(pixel_values[slot], expected, rtol=0, atol=2e-6)
                assert torch.equal(labels[slot], batch["labels"][slot].long())
    assert fillers >= 2 * 4  # 8 of the 10 records are used, 6 of the 10 are bad


def test_training_padding_is_black_in_the_image_and_ignore_in_the_labels(synthetic_dataset_dir):
    stream = SegmentationStream(
        synthetic_dataset_dir, "train", per_process_batch_size=2, training=True, crop_size_px=64,
        scale_range=(0.5, 0.5), flips=False, color_jitter=0.0, **IMAGENET,
    )  # fmt: skip

    batch = next(iter(make_dataloader(stream)))

    padded = batch["labels"] == 255
    assert padded.float().mean() >= 0.75  # a 32 px chip in a 64 px crop
    assert (batch["pixel_values"].permute(0, 2, 3, 1)[padded] == 0).all()
    black = (torch.zeros(3) - torch.tensor(IMAGENET["image_mean"])) / torch.tensor(IMAGENET["image_std"])
    pixels = batch_to_model_inputs(batch, "cpu")[0].permute(0, 2, 3, 1)[padded]
    assert torch.allclose(pixels[0], black) and torch.allclose(pixels[-1], black)


def test_augmentation_moves_image_and_mask_together(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for index in range(12):
        mask = np.zeros((64, 64), np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, 48, 2)
            mask[top : top + rng.integers(6, 16), left : left + rng.integers(6, 16)] = 1
        image = np.repeat((mask * 200)[..., None], 3, axis=2)  # the image draws its own mask
        rows.append(
            {"image": {"bytes": _png(image), "path": None}, "mask": {"bytes": _png(mask), "path": None}}
        )
    _write_split(tmp_path, "train", rows, 2, Features({"image": Image(), "mask": Image()}))
    stream = SegmentationStream(
        tmp_path, "train", per_process_batch_size=4, training=True, crop_size_px=48, scale_range=(0.6, 1.6),
        color_jitter=0.0, **IDENTITY,
    )  # fmt: skip

    batches = list(make_dataloader(stream))

    brightness = torch.cat([b["pixel_values"][:, 0] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    labelled = labels != 255
    assert ((brightness > 100) == (labels == 1))[labelled].float().mean() > 0.97
    assert (brightness[~labelled] == 0).all()  # padding: black image, ignored label
    assert 0 < (~labelled).float().mean() < 0.5


def test_evaluation_batches_are_the_chips_and_masks_each_once_with_their_position_in_the_split(
    synthetic_dataset_dir,
):
    stream = SegmentationStream(
        synthetic_dataset_dir, "validation", per_process_batch_size=3, training=False, **IMAGENET
    )
    records = [row for path in sorted((synthetic_dataset_dir / "data").glob("validation-*.parquet"))
               for row in pq.read_table(path).to_pylist()]  # fmt: skip

    batches = list(make_dataloader(stream))

    assert len(batches) == stream.batches_per_pass and all(len(b["record_index"]) <= 3 for b in batches)
    mean, std = (
        torch.tensor(IMAGENET["image_mean"]).view(3, 1, 1),
        torch.tensor(IMAGENET["image_std"]).view(3, 1, 1),
    )
    seen = []
    for batch in batches:
        pixel_values, labels = batch_to_model_inputs(batch, "cpu")
        for slot, index in enumerate(batch["record_index"].tolist()):
            seen.append(index)
            record = records[index]
            image = torch.from_numpy(np.array(PILImage.open(io.BytesIO(record["image"]["bytes"])))).permute(
                2, 0, 1
            )
            mask = torch.from_numpy(np.array(PILImage.open(io.BytesIO(record["mask"]["bytes"]))))
            assert torch.equal(batch["pixel_values"][slot], image) and torch.equal(
                batch["labels"][slot], mask
            )
            assert torch.allclose(pixel_values[slot], (image.float() - mean) / std, atol=1e-5)
            assert torch.equal(labels[slot], mask.long())
    assert sorted(seen) == list(range(len(records))) == list(range(8))


def test_evaluation_resizes_only_when_asked(synthetic_dataset_dir):
    stream = SegmentationStream(
        synthetic_dataset_dir, "test", per_process_batch_size=8, training=False, resize_to_px=32,
        readers_per_process=1, **IMAGENET,
    )  # fmt: skip

    batch = next(iter(make_dataloader(stream)))

    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].shape == (8, 32, 32)
    assert set(batch["labels"].unique().tolist()) <= {0, 1, 255}


def test_colour_jitter_folded_into_normalisation_matches_the_stepwise_definition():
    images = torch.randint(
        0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    jitter = ColorJitter(brightness=1.1, contrast=0.9, saturation=1.2)
    mean, std = (
        torch.tensor(IMAGENET["image_mean"]).view(3, 1, 1),
        torch.tensor(IMAGENET["image_std"]).view(3, 1, 1),
    )

    x = images[0].float() * jitter.brightness
    x = jitter.contrast * x + (1 - jitter.contrast) * x.mean(0).mean()
    x = jitter.saturation * x + (1 - jitter.saturation) * x.mean(0, keepdim=True)
    pixel_values = Normalizer(**IMAGENET)(images, [jitter, None])

    assert torch.allclose(pixel_values[0], (x - mean) / std, atol=1e-4)
    assert torch.allclose(pixel_values[1], (images[1].float() - mean) / std, atol=1e-5)


# ---- processes, workers, passes -----------------------------------------------------------------------------


def test_every_training_record_is_used_once_per_pass_across_two_processes_with_equal_step_counts(tmp_path):
    source = _write_indexed_dataset(tmp_path, num_records=23)
    streams = [
        SegmentationStream(source, "train", per_process_batch_size=3, training=True, process_index=rank,
                           num_processes=2, buffer_batches=2, **NO_AUGMENTATION, **IDENTITY)
        for rank in (0, 1)
    ]  # fmt: skip

    per_process = [[_indices(b) for b in make_dataloader(stream)] for stream in streams]

    assert len(per_process[0]) == len(per_process[1]) == streams[0].steps_per_pass == 3
    seen = [i for batches in per_process for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 18
    assert streams[0].dropped_remainder_records == streams[1].dropped_remainder_records == 23 - 18
    assert set(seen) < set(range(23))


def test_every_evaluation_record_is_used_once_across_two_processes(tmp_path):
    source = _write_indexed_dataset(tmp_path, num_records=20, split="validation")
    streams = [
        SegmentationStream(source, "validation", per_process_batch_size=3, training=False, process_index=rank,
                           num_processes=2, **IDENTITY)
        for rank in (0, 1)
    ]  # fmt: skip

    per_process = [[_indices(b) for b in make_dataloader(stream)] for stream in streams]

    assert [len(batches) for batches in per_process] == [s.batches_per_pass for s in streams]
    assert all(len(batch) <= 3 for batches in per_process for batch in batches)
    assert sorted(i for batches in per_process for batch in batches for i in batch) == list(range(20))
    assert streams[0].dropped_remainder_records == 0


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_batches_do_not_depend_on_the_number_of_workers(synthetic_dataset_dir, training):
    stream = SegmentationStream(
        synthetic_dataset_dir, "train", per_process_batch_size=5, training=training, crop_size_px=48,
        buffer_batches=2, seed=7, **IMAGENET,
    )  # fmt: skip

    _assert_same_batches(
        list(make_dataloader(stream, num_workers=0)), list(make_dataloader(stream, num_workers=2))
    )


def test_shuffle_changes_with_the_epoch_and_repeats_for_the_same_seed(tmp_path):
    source = _write_indexed_dataset(tmp_path, num_records=40)

    def order(seed: int, epoch: int) -> list[int]:
        stream = SegmentationStream(source, "train", per_process_batch_size=4, training=True, seed=seed,
                                    buffer_batches=2, **NO_AUGMENTATION, **IDENTITY)  # fmt: skip
        stream.set_epoch(epoch)
        return [i for batch in make_dataloader(stream) for i in _indices(batch)]

    epoch_0, epoch_1 = order(seed=0, epoch=0), order(seed=0, epoch=1)

    for order_ in (epoch_0, epoch_1):
        assert len(order_) == len(set(order_)) >= 32 and set(order_) <= set(range(40))
    assert epoch_0 != epoch_1
    assert epoch_0 != list(range(40))
    assert order(seed=0, epoch=1) == epoch_1
    assert order(seed=1, epoch=1) != epoch_1


def test_evaluation_is_not_shuffled(tmp_path):
    source = _write_indexed_dataset(tmp_path, num_records=12, split="validation")
    stream = SegmentationStream(source, "validation", per_process_batch_size=5, training=False, **IDENTITY)
    stream.set_epoch(3)

    assert [i for batch in make_dataloader(stream) for i in _indices(batch)] == list(range(12))


# ---- position -----------------------------------------------------------------------------------------------


def test_restoring_the_state_continues_with_exactly_the_batches_of_an_uninterrupted_pass(
    synthetic_dataset_dir,
):
    def new_stream() -> SegmentationStream:
        return SegmentationStream(
            synthetic_dataset_dir, "train", per_process_batch_size=3, training=True, crop_size_px=48,
            buffer_batches=2, seed=11, **IMAGENET,
        )  # fmt: skip

    uninterrupted_stream = new_stream()
    uninterrupted_stream.set_epoch(2)
    uninterrupted = list(make_dataloader(uninterrupted_stream, num_workers=0))

    interrupted = new_stream()
    interrupted.set_epoch(2)
    consumed = []
    for batch in make_dataloader(interrupted, num_workers=2):
        consumed.append(batch)
        if len(consumed) == 3:
            break
    state = interrupted.state_dict(batches_consumed=len(consumed))
    resumed = new_stream()
    resumed.load_state_dict(state)
    rest = list(make_dataloader(resumed, num_workers=2))

    assert state == {"epoch": 2, "start_step": 3}
    _assert_same_batches(uninterrupted, consumed + rest)


def test_moving_to_another_epoch_starts_it_at_step_zero(synthetic_dataset_dir):
    stream = SegmentationStream(
        synthetic_dataset_dir, "train", per_process_batch_size=4, training=True, **IMAGENET
    )
    stream.load_state_dict({"epoch": 1, "start_step": 5})

    stream.set_epoch(1)
    assert stream.state_dict() == {"epoch": 1, "start_step": 5}
    stream.set_epoch(2)
    assert stream.state_dict() == {"epoch": 2, "start_step": 0}


# ---- bad samples -------------------------------------------------------------------------------------------


BAD_RECORDS = {
    1: "undecodable_image",
    3: "mask_size_mismatch",
    5: "mask_values",
    6: "image_band_count",
    8: "undecodable_mask",
    9: "mask_not_single_channel",
}


@pytest.fixture
def dataset_with_bad_samples(tmp_path) -> Path:
    """Ten 16 px records, six of them bad (see ``BAD_RECORDS``)."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(10):
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        mask = (rng.random((16, 16)) < 0.2).astype(np.uint8)
        image_bytes, mask_bytes = _jpeg(image), _png(mask)
        if index == 1:  # corrupt JPEG: truncated
            image_bytes = image_bytes[: len(image_bytes) // 3]
        if index == 3:
            mask_bytes = _png(np.zeros((12, 16), np.uint8))
        if index == 5:
            mask[2, 2] = 7
            mask_bytes = _png(mask)
        if index == 6:  # one band where three are expected
            image_bytes = _jpeg(image[..., 0])
        if index == 8:
            mask_bytes = b"not a PNG at all"
        if index == 9:
            mask_bytes = _png(np.repeat(mask[..., None], 3, axis=2))
        rows.append(
            {
                "image": {"bytes": image_bytes, "path": f"chip-{index}.jpg"},
                "mask": {"bytes": mask_bytes, "path": None},
            }
        )
    _write_split(tmp_path, "train", rows, 2, Features({"image": Image(), "mask": Image()}))
    return tmp_path


def test_bad_samples_are_replaced_by_ignore_fillers_and_reported(dataset_with_bad_samples, caplog):
    stream = SegmentationStream(
        dataset_with_bad_samples, "train", per_process_batch_size=4, training=False, **IMAGENET
    )

    with caplog.at_level(logging.WARNING, logger="sidewalk_hf.data.streaming"):
        batches = list(make_dataloader(stream))

    reported = [bad for batch in batches for bad in batch["bad_samples"]]
    assert reported == [
        BadSample(reason, index, f"chip-{index}.jpg") for index, reason in BAD_RECORDS.items()
    ]
    labels = torch.cat([b["labels"] for b in batches])
    pixels = torch.cat([b["pixel_values"] for b in batches])
    inputs = torch.cat([batch_to_model_inputs(b, "cpu")[0] for b in batches])
    for index in range(10):
        filler = index in BAD_RECORDS
        assert bool((labels[index] == 255).all()) == filler
        assert bool((pixels[index] == 0).all()) == filler
        assert bool((inputs[index] == 0).all()) == filler
    assert "record 5 (key 'chip-5.jpg')" in caplog.text and "[7]" in caplog.text


def test_bad_samples_keep_training_batch_shapes_and_step_counts(dataset_with_bad_samples):
    stream = SegmentationStream(
        dataset_with_bad_samples,
        "train",
        per_process_batch_size=4,
        training=True,
        crop_size_px=12,
        **IMAGENET,
    )

    batches = list(make_dataloader(stream, num_workers=2))

    assert len(batches) == 2  # 10 records: two full steps of 4, two records dropped
    assert all(b["pixel_values"].shape == (4, 3, 12, 12) for b in batches)
    reported = {bad.record_index: bad.reason for b in batches for bad in b["bad_samples"]}
    assert len(reported) >= 4 and set(reported.values()) <= set(BAD_RECORDS.values())


def test_a_bad_sample_raises_naming_the_record_when_configured_to(dataset_with_bad_samples):
    stream = SegmentationStream(
        dataset_with_bad_samples,
        "train",
        per_process_batch_size=4,
        training=False,
        on_bad_sample="error",
        **IMAGENET,
    )

    with pytest.raises(
        ValueError, match=r"record 1 \(key 'chip-1.jpg'\): image cannot be decoded .*undecodable_image"
    ):
        list(make_dataloader(stream))
