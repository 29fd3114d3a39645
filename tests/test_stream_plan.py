"""Planned reading: each record of a parquet split fetched once per pass across processes and workers,
on every layout, with the guarantees of the stream kept (equal steps, exact resume, shuffle quality)."""

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

from sidewalk_hf.data import SegmentationStream, make_dataloader
from sidewalk_hf.data.parquet_plan import (
    ReaderOrder,
    part_size,
    plan_pass,
    read_layout,
    reader_records,
    split_parquet_files,
)
from sidewalk_hf.data.synthetic import generate_synthetic_dataset

IDENTITY = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "rescale_factor": 1.0}
NO_AUGMENTATION = {"scale_range": (1.0, 1.0), "flips": False, "color_jitter": 0.0}
FEATURES = Features({"image": Image(), "mask": Image()})


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


_MASK = _png(np.zeros((4, 4), np.uint8))


def _record(index: int) -> dict:
    """A 4x4 chip whose pixels spell its index (red = index % 256, green = index // 256)."""
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 1] = index % 256, index // 256
    return {
        "image": {"bytes": _png(image), "path": f"chip-{index}.png"},
        "mask": {"bytes": _MASK, "path": None},
    }


def write_layout(root: Path, file_sizes: list[int], rows_per_group: int, split: str = "train") -> Path:
    """Parquet files in the Hub layout with the given record counts, records numbered across files."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    first = 0
    for shard, size in enumerate(file_sizes):
        table = pa.Table.from_pylist([_record(first + i) for i in range(size)], schema=FEATURES.arrow_schema)
        path = root / "data" / f"{split}-{shard:05d}-of-{len(file_sizes):05d}.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group)
        first += size
    return root


LAYOUTS = {
    "many small files": ([16] * 24, 16),
    "few large files, many row groups": ([128, 128], 8),
    "a single file": ([256], 8),
}


def _indices(batch: dict) -> list[int]:
    pixels = batch["pixel_values"][:, :, 0, 0].long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def _stream(source, rank=0, world=2, **options) -> SegmentationStream:
    settings = {"per_process_batch_size": 4, "training": True, "buffer_batches": 2, "seed": 3}
    settings.update(options)
    return SegmentationStream(
        source, "train", process_index=rank, num_processes=world, **settings, **NO_AUGMENTATION, **IDENTITY
    )


def _one_pass(streams, num_workers):
    """Per process: the record identities of each batch, and the records fetched."""
    passes = []
    for stream in streams:
        batches = list(make_dataloader(stream, num_workers=num_workers))
        passes.append(([_indices(b) for b in batches], sum(b["records_read"] for b in batches)))
    return passes


# ---- the plan ---------------------------------------------------------------------------------------------


def _layout(tmp_path, sizes, rows_per_group):
    source = write_layout(tmp_path, sizes, rows_per_group)
    return read_layout(split_parquet_files(source, "train"), ["image", "mask"])


def test_a_plan_of_whole_row_groups_gives_no_row_group_to_two_readers_and_each_reader_its_part_of_each_batch(
    tmp_path,
):
    layout = _layout(tmp_path, [96, 64, 80, 30], rows_per_group=7)
    plan = plan_pass(
        layout, num_processes=2, readers_per_process=3, batch_size=4, training=True, seed=0, epoch=0
    )

    assert plan.mode == "whole row groups"
    groups = [{(s.row_group.file_index, s.row_group.index) for s in line} for line in plan.lines]
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # disjoint
    # A batch of 4 from 3 readers: 2 records from one of them, 1 from each other, in turn.
    assert [[part_size(t, j, 4, 3) for j in range(3)] for t in range(3)] == [[2, 1, 1], [1, 1, 2], [1, 2, 1]]
    assert [reader_records(7, j, 4, 3) for j in range(3)] == [10, 9, 9]
    for g, line in enumerate(plan.lines):
        assert plan.line_records(g) == reader_records(plan.steps, g % 3, 4, 3)
        assert all(s.start == 0 for s in line)  # a line ends mid row group, never starts there
    assert plan.dropped_records == layout.num_records - plan.steps * 2 * 4
    assert plan.dropped_records <= 2 * 3 * 7 + 2 * 4  # at most a row group per reader and a step
    assert plan.fetched_records <= layout.num_records


def test_a_batch_smaller_than_the_readers_leaves_the_spare_readers_empty(tmp_path):
    layout = _layout(tmp_path, [40, 40], rows_per_group=5)
    plan = plan_pass(
        layout, num_processes=1, readers_per_process=4, batch_size=2, training=True, seed=0, epoch=0
    )

    assert [plan.line_records(g) for g in range(4)] == [plan.steps, plan.steps, 0, 0]
    assert plan.steps == 40 and plan.dropped_records == 0


def test_readers_with_as_many_row_groups_each_drop_nothing_when_the_batch_does_not_divide_among_them(
    tmp_path,
):
    # 32 row groups of 25 records for 4 processes x 4 readers, batches of 10: 2 row groups per reader,
    # 50 records = 5 batches' worth each, while parts are 3, 3, 2 and 2 records.
    layout = _layout(tmp_path, [25] * 32, rows_per_group=25)
    plan = plan_pass(
        layout, num_processes=4, readers_per_process=4, batch_size=10, training=True, seed=0, epoch=0
    )

    assert plan.mode == "whole row groups"
    assert plan.steps == 20 and plan.dropped_records == 0 and plan.fetched_records == 800


def test_the_plan_is_the_same_for_the_same_seed_and_epoch_and_changes_with_either(tmp_path):
    layout = _layout(tmp_path, [60, 60], rows_per_group=5)

    def lines(seed, epoch):
        plan = plan_pass(
            layout,
            num_processes=2,
            readers_per_process=2,
            batch_size=4,
            training=True,
            seed=seed,
            epoch=epoch,
        )
        return [[(s.row_group.first_record, s.start, s.stop) for s in line] for line in plan.lines]

    assert lines(0, 1) == lines(0, 1)
    assert lines(0, 1) != lines(0, 2)
    assert lines(0, 1) != lines(1, 1)


def test_fewer_row_groups_than_readers_cuts_row_groups_between_readers_and_says_so(tmp_path, caplog):
    source = write_layout(tmp_path, [30], rows_per_group=30)  # one file, one row group, 8 readers

    with caplog.at_level(logging.WARNING, logger="sidewalk_hf.data.streaming"):
        streams = [_stream(source, rank) for rank in (0, 1)]
    (batches_0, fetched_0), (batches_1, fetched_1) = _one_pass(streams, num_workers=0)

    assert streams[0].pass_plan.mode == "cut row groups"
    assert "fewer row groups than readers (1 < 8)" in caplog.text
    assert len(batches_0) == len(batches_1) == streams[0].steps_per_pass == 30 // 8
    seen = [i for batch in batches_0 + batches_1 for i in batch]
    assert len(seen) == len(set(seen)) == 30 - streams[0].dropped_remainder_records == 24
    assert fetched_0 + fetched_1 == streams[0].pass_plan.fetched_records > 30  # shared, and counted


def test_an_evaluation_plan_holds_every_record_once(tmp_path):
    for sizes, rows_per_group in ([[13, 7, 22], 4], [[5], 5]):
        layout = _layout(tmp_path / f"{len(sizes)}", sizes, rows_per_group)
        plan = plan_pass(
            layout, num_processes=2, readers_per_process=2, batch_size=3, training=False, seed=0, epoch=0
        )
        records = sorted(
            s.row_group.first_record + row
            for line in plan.lines
            for s in line
            for row in range(s.start, s.stop)
        )
        assert records == list(range(sum(sizes))) and plan.dropped_records == 0


def test_the_reader_order_is_a_buffer_shuffle_that_emits_every_position_once():
    order = ReaderOrder.for_reader(1000, training=True, buffer_size=64, seed=0, epoch=0, reader=1)
    emitted = list(order)

    assert sorted(emitted) == list(range(1000)) and emitted != list(range(1000))
    assert max(abs(position - place) for place, position in enumerate(emitted[:900])) > 64
    assert list(ReaderOrder.for_reader(5, training=False, buffer_size=64, seed=0, epoch=0, reader=0)) == list(
        range(5)
    )


# ---- every layout: every record used once, fetched once, equal steps ----------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_every_record_is_used_once_and_fetched_once_per_pass_across_two_processes(tmp_path, layout):
    sizes, rows_per_group = LAYOUTS[layout]
    source = write_layout(tmp_path, sizes, rows_per_group)
    streams = [_stream(source, rank) for rank in (0, 1)]

    (batches_0, fetched_0), (batches_1, fetched_1) = _one_pass(streams, num_workers=0)

    assert streams[0].pass_plan.mode == "whole row groups"
    assert len(batches_0) == len(batches_1) == streams[0].steps_per_pass == streams[1].steps_per_pass
    seen = [i for batch in batches_0 + batches_1 for i in batch]
    assert len(seen) == len(set(seen)) == sum(sizes) - streams[0].dropped_remainder_records
    assert fetched_0 + fetched_1 <= sum(sizes)  # no record fetched twice across the job


def test_two_dataloader_workers_fetch_each_record_once_and_give_the_batches_of_none(tmp_path):
    source = write_layout(tmp_path, [128, 128], rows_per_group=8)
    streams = [_stream(source, rank) for rank in (0, 1)]

    without = _one_pass(streams, num_workers=0)
    with_two = _one_pass(streams, num_workers=2)

    assert [batches for batches, _ in with_two] == [batches for batches, _ in without]
    assert sum(fetched for _, fetched in with_two) <= 256


def test_a_number_of_workers_that_does_not_divide_the_readers_gives_the_same_batches_and_says_it_reads_more(
    tmp_path, caplog
):
    source = write_layout(tmp_path, [64, 64], rows_per_group=8)
    stream = _stream(source, world=1)

    expected = list(make_dataloader(stream, num_workers=0))
    with caplog.at_level(logging.WARNING):
        actual = list(make_dataloader(stream, num_workers=3))

    assert [_indices(b) for b in actual] == [_indices(b) for b in expected]
    assert sum(b["records_read"] for b in expected) == 128
    assert 2 * 128 < sum(b["records_read"] for b in actual) <= 3 * 128  # each worker reads (nearly) all
    assert "3 DataLoader workers for 4 readers per process: each reader is read by 3 workers" in caplog.text


def test_the_layout_the_synthetic_generator_writes_is_planned_and_read_once(tmp_path):
    source = generate_synthetic_dataset(
        tmp_path / "dataset",
        num_train=64,
        num_validation=2,
        num_test=2,
        chip_size_px=32,
        seed=0,
        num_shards=2,
    )
    stream = SegmentationStream(
        source,
        "train",
        per_process_batch_size=4,
        training=True,
        readers_per_process=1,
        crop_size_px=32,
        **IDENTITY,
    )

    batches = list(make_dataloader(stream))

    assert stream.planned and stream.pass_plan.mode == "whole row groups"
    assert len(batches) == 16 and sum(b["records_read"] for b in batches) == 64
    assert sorted(int(i) for b in batches for i in b["record_index"]) == list(range(64))


def test_a_batch_joins_one_part_from_each_reader_and_chips_of_several_sizes_are_padded_as_one_batch(
    tmp_path,
):
    (tmp_path / "data").mkdir()
    records = []
    for index in range(64):
        side = 4 if index % 3 else 6
        image = np.zeros((side, side, 3), np.uint8)
        image[..., 0] = index
        records.append({"image": {"bytes": _png(image), "path": None},
                        "mask": {"bytes": _png(np.ones((side, side), np.uint8)), "path": None}})  # fmt: skip
    for shard in range(4):
        table = pa.Table.from_pylist(records[shard * 16 : (shard + 1) * 16], schema=FEATURES.arrow_schema)
        pq.write_table(table, tmp_path / "data" / f"train-{shard:05d}-of-00004.parquet", row_group_size=4)
    stream = _stream(tmp_path, world=1, per_process_batch_size=4)

    assert stream.parts_per_batch == 4
    batches = list(make_dataloader(stream, num_workers=2))
    assert [b["record_index"].tolist() for b in batches] == [
        b["record_index"].tolist() for b in make_dataloader(stream, num_workers=0)
    ]
    plan = stream.pass_plan
    for batch in batches:
        chips = batch["pixel_values"][:, 0, 0, 0].tolist()
        readers = {g for g, line in enumerate(plan.lines) for s in line
                   for chip in chips if s.row_group.first_record <= chip < s.row_group.first_record + 4}  # fmt: skip
        assert len(readers) == 4  # one record from each reader's row groups
        for slot, chip in enumerate(chips):
            side = 4 if chip % 3 else 6
            assert (batch["labels"][slot, :side, :side] == 1).all()
            padded = batch["labels"].shape[1] * batch["labels"].shape[2] - side * side
            assert (batch["labels"][slot] == 255).sum() == padded
    assert any(b["pixel_values"].shape[-1] == 6 for b in batches)


def test_a_dataloader_given_the_stream_itself_gives_the_same_batches(tmp_path):
    source = write_layout(tmp_path, [64, 64], rows_per_group=8)
    stream = _stream(source, world=1)

    expected = list(make_dataloader(stream, num_workers=0))
    direct = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))

    assert [_indices(b) for b in direct] == [_indices(b) for b in expected]
    assert [b["record_index"].tolist() for b in direct] == [b["record_index"].tolist() for b in expected]


# ---- resume -------------------------------------------------------------------------------------------------


def test_a_resumed_pass_has_the_batches_of_an_uninterrupted_one_and_refetches_only_what_is_to_come(tmp_path):
    source = write_layout(tmp_path, [192] * 4, rows_per_group=8)
    uninterrupted = _stream(source, rank=1)
    uninterrupted.set_epoch(1)
    full = list(make_dataloader(uninterrupted, num_workers=2))

    resumed = _stream(source, rank=1)
    resumed.load_state_dict({"epoch": 1, "start_step": 80})
    rest = list(make_dataloader(resumed, num_workers=2))

    assert len(full) == uninterrupted.steps_per_pass == 80 + len(rest) == 96
    assert [_indices(b) for b in rest] == [_indices(b) for b in full[80:]]
    for got, want in zip(rest, full[80:]):
        assert got["record_index"].tolist() == want["record_index"].tolist()
    refetched = sum(b["records_read"] for b in rest)
    assert refetched < sum(b["records_read"] for b in full) / 2  # 16 of 96 batches left to read


# ---- shuffle quality ------------------------------------------------------------------------------------------


PASSES = 6  # the correlation of one pass is noisy (about 1 / sqrt(row groups)): compare means
CORRELATION_NOISE = 0.03


def shuffle_quality(batches: list[list[int]], file_of: dict[int, int]) -> tuple[float, float]:
    """|Spearman correlation| between a record's position in the files and in the pass (0 is best), and the
    mean number of distinct files per batch (higher is better)."""
    order = np.array([i for batch in batches for i in batch])
    pass_position = np.argsort(order)  # of the records in file order
    correlation = abs(np.corrcoef(np.arange(len(order)), pass_position)[0, 1]) if len(order) else 1.0
    distinct = np.mean([len({file_of[i] for i in batch}) for batch in batches])
    return float(correlation), float(distinct)


@pytest.mark.parametrize(
    "files, rows_per_group",
    [(16, 8), (32, 24)],  # 3 row groups per file; one per file, so each of the 4 readers owns 8 files
)
def test_the_planned_shuffle_is_no_worse_than_the_whole_stream_shuffle_at_the_same_buffer_size(
    tmp_path, files, rows_per_group
):
    sizes = [24] * files
    source = write_layout(tmp_path, sizes, rows_per_group=rows_per_group)
    file_of = {
        i: f
        for f, start in enumerate(itertools.accumulate([0, *sizes[:-1]]))
        for i in range(start, start + 24)
    }

    def quality(read_plan):
        stream = _stream(source, world=1, per_process_batch_size=8, buffer_batches=2, read_plan=read_plan)
        measures = []
        for epoch in range(PASSES):
            stream.set_epoch(epoch)
            measures.append(shuffle_quality([_indices(b) for b in make_dataloader(stream)], file_of))
        return np.mean(measures, axis=0)

    planned, whole_stream = quality("auto"), quality("whole_stream")
    print(f"planned {planned}, whole stream {whole_stream}")

    assert planned[0] <= whole_stream[0] + CORRELATION_NOISE
    assert planned[1] >= whole_stream[1]
