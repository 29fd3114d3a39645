"""Streaming a segmentation split into ready batches: each record read once per pass across the whole job.

``SegmentationStream`` is a torch ``IterableDataset`` that yields whole batches. A job has ``W`` processes,
each with ``R = readers_per_process`` *readers*; reader ``j`` of process ``r`` reads only its own rows of
the split, as ``parquet_plan.plan_pass`` assigns them from the parquet footers and ``(seed, epoch, W, R,
B)`` (``B`` records per batch on a process): in training the row groups are shuffled per epoch and given
to the readers, each reader buffer-shuffles its own records, and batch ``t`` of a process joins one
*part* from each of its ``P = min(B, R)`` readers: the next ``part_size(t, j, B, R)`` records of reader
``j`` (``B // R`` or ``B // R + 1``, the larger parts passing from reader to reader step by step).
``make_dataloader`` returns a ``StreamLoader``: DataLoader worker ``k`` of ``n`` builds the parts ``i = (t
- start_step) * P + j`` with ``i % n == k`` (so it reads the readers ``j`` with ``j % gcd(n, P) == k %
gcd(n, P)``) and hands over one item per step, its parts of that step; the main process joins the ``n``
items of a step into its batch, in reader order.
Hence, with no communication between processes:

- every record is used once per pass across all processes, and fetched once: no row group is read by
  two readers, except where the plan cuts one between readers (few or large row groups; logged with
  the read it costs) and when ``n`` does not divide ``P`` (each reader is then read by ``n / gcd(n, P)``
  workers; logged);
- every process runs the same number of training steps: the plan gives each reader its part of every
  step; the records that do not fit (part of a row group per reader, or less than one global step)
  are dropped, and counted (``dropped_remainder_records``);
- batches do not depend on ``num_workers``: the DataLoader's in-order round robin over workers yields
  parts in order whatever ``n`` is, and a batch's contents depend only on the plan and the readers'
  shuffles (the read cost does depend on ``n``: see above); a DataLoader given the stream itself gets
  the same batches, each worker building whole ones from all readers (read ``min(n, P)`` times over);
- resuming is exact: ``set_start_step(s)`` replays the readers' shuffles on record positions, without
  data, and re-reads only the row groups that still hold records to come;
- a parquet file that cannot be read (a truncated copy, a corrupt row group) raises ``ShardReadError``
  naming it, in the main process and in DataLoader workers alike, or with ``on_bad_sample="skip"`` is
  skipped: an unreadable footer leaves the file out of the plan, reported once per pass as a
  ``BadSample("unreadable_file", -1, file)`` with the first batch of process 0; an unreadable row group
  turns its records into fillers reported as ``BadSample("unreadable_file", record_index, file)``.

In evaluation nothing is shuffled or dropped: readers hold whole row groups in file order (or nearly equal
shares of the split when there are fewer row groups than readers), each reader's last batch may be short,
processes may yield different numbers of batches (evaluation has no per-step collective), and the order of
a process's batches, not their contents, may depend on ``num_workers``.

A split that is not stored as parquet (or ``read_plan="whole_stream"``) is read the older way, with a
warning that the read is amplified: every process and every worker reads the same seeded, buffer-shuffled
stream of undecoded records from ``datasets.load_dataset(..., streaming=True)``, cut into global steps of
``W * B`` records, and decodes only its own. Exact too, at ``W * n`` times the read. Neither way goes
through ``accelerator.prepare`` (which would shard the stream again) or
``datasets.distributed.split_dataset_by_node`` (its per-node example counts differ when shards differ in
size).

Batches are compact: uint8 images (augmented, not normalised) and uint8 labels, with each sample's colour
jitter and normalisation as three float32 coefficients per band. The consumer calls
``batch_to_model_inputs`` to get float32 normalised images and int64 labels on its device. Handing float32
and int64 batches from the workers to the main process costs more than decoding the chips, and copying
them to a GPU moves four (images) and eight (labels) times the bytes of uint8.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import datasets
import fsspec.asyn
import numpy as np
import pyarrow as pa
import torch
import torch.utils.data
from PIL import Image

from .parquet_plan import (
    PassPlan,
    ReaderOrder,
    ShardReadError,
    SplitLayout,
    describe,
    part_size,
    plan_pass,
    read_layout,
    reader_buffer_size,
    split_parquet_files,
)
from .transforms import (
    ColorJitter,
    Normalizer,
    apply_geometry,
    apply_normalization,
    augmentation_generator,
    draw_augmentation,
    resize_pair,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "mask")
BAD_SAMPLE_REASONS = (
    "undecodable_image",
    "image_not_8bit",
    "image_band_count",
    "undecodable_mask",
    "mask_not_single_channel",
    "mask_size_mismatch",
    "mask_values",
    "unreadable_file",
)
LABEL_VALUES = (0, 1, 255)  # background, sidewalk, ignore
FALLBACK_FILLER_SIZE_PX = 32  # side of the fillers of a batch in which no record's size could be read
DEFAULT_READERS_PER_PROCESS = 4  # 0, 1, 2 or 4 DataLoader workers read each record once
READ_PLANS = ("auto", "parquet", "whole_stream")
_LOGGED_PLANS: set[tuple[str, str, str]] = set()
_IS_LABEL_VALUE = np.isin(np.arange(256), LABEL_VALUES)


class BadSample(NamedTuple):
    """A record replaced by an all-ignore filler: ``reason`` is one of ``BAD_SAMPLE_REASONS``,
    ``record_index`` the record's position in the pass, ``key`` its image path when the dataset has one
    (for ``"unreadable_file"`` the file; ``record_index`` -1 for a whole file left out of the pass)."""

    reason: str
    record_index: int
    key: str | None


class _Record(NamedTuple):
    """An undecoded record (two ``datasets.Image`` cells) and where it was read (a file and row group)."""

    image: dict | None
    mask: dict | None
    origin: str | None


class _UnreadableRecord(NamedTuple):
    """A record of a row group that could not be read (``on_bad_sample="skip"``)."""

    file: str
    detail: str


class _Sample(NamedTuple):
    """A decoded record ready for its batch: uint8 image [C, H, W], uint8 mask [H, W], colour jitter."""

    image: torch.Tensor
    mask: torch.Tensor
    jitter: ColorJitter | None


class BadSampleError(ValueError):
    """A record that cannot be used, raised when ``on_bad_sample="error"``. ``size_hw`` is the record's
    size when it could be read, so that its filler can match it."""

    def __init__(self, reason: str, detail: str, size_hw: tuple[int, int] | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.size_hw = reason, detail, size_hw


def open_split(
    source: str | os.PathLike, split: str, *, streaming: bool = True, **load_dataset_kwargs: Any
) -> datasets.IterableDataset | datasets.Dataset:
    """Open one split of a segmentation dataset: a local folder in the Hub layout or a Hub dataset id.

    Checks that the ``image`` and ``mask`` columns exist, so that a wrong dataset fails at start rather
    than at the first batch. Extra keyword arguments go to ``datasets.load_dataset``.
    """
    source = os.fspath(source)
    try:
        dataset = datasets.load_dataset(source, split=split, streaming=streaming, **load_dataset_kwargs)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise _dataset_not_found(source, error) from error
    columns = dataset.column_names
    if columns is None:  # a stream whose features are only known once read
        first = next(iter(dataset.take(1)), {})
        columns = list(first)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(
            f"dataset {source!r} split {split!r} has no {' or '.join(repr(m) for m in missing)} column: "
            f"its columns are {list(columns)}; a segmentation dataset needs an 'image' and a 'mask' column, "
            "both datasets.Image() features"
        )
    return dataset


def decode_image(cell: dict | None, num_channels: int) -> torch.Tensor:
    """uint8 [C, H, W] tensor (channels-last strides, as decoded) from a ``datasets.Image`` cell."""
    size_hw = None
    try:
        with Image.open(_image_file(cell)) as image:
            size_hw = (image.height, image.width)  # from the header, before decoding
            array = np.array(image)
    # Decoders raise OSError, SyntaxError, ValueError...: whichever it is, the record is unusable.
    except Exception as error:
        raise BadSampleError("undecodable_image", f"image cannot be decoded ({error})", size_hw) from error
    if array.dtype != np.uint8:
        raise BadSampleError(
            "image_not_8bit", f"image has {array.dtype} pixels, expected 8-bit (uint8)", size_hw
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != num_channels:
        raise BadSampleError(
            "image_band_count",
            f"image has {array.shape[2]} bands, expected {num_channels} (image_mean has that many)",
            size_hw,
        )
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_mask(cell: dict | None, image_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [H, W] tensor with values in {0, 1, 255}, the size of the image, from a ``datasets.Image`` cell."""
    try:
        with Image.open(_image_file(cell)) as mask_image:
            mask = np.array(mask_image)  # a palette PNG gives its indices, which are the labels
    except Exception as error:
        raise BadSampleError("undecodable_mask", f"mask cannot be decoded ({error})", image_hw) from error
    if mask.ndim != 2:
        raise BadSampleError(
            "mask_not_single_channel", f"mask has shape {mask.shape}, expected one channel", image_hw
        )
    if mask.shape != image_hw:
        raise BadSampleError(
            "mask_size_mismatch",
            f"mask is {mask.shape[1]}x{mask.shape[0]} px, image is {image_hw[1]}x{image_hw[0]} px",
            image_hw,
        )
    if mask.dtype == np.uint8:
        valid = mask.max(initial=0) <= 1 or _IS_LABEL_VALUE[mask].all()
    else:  # 1-bit, 16-bit or float masks are fine as long as their values are labels
        valid = np.isin(mask, LABEL_VALUES).all()
    if not valid:
        values = np.unique(mask[~np.isin(mask, LABEL_VALUES)])[:10].tolist()
        raise BadSampleError(
            "mask_values", f"mask has values {values}; valid values are 0, 1 and 255 (ignore)", image_hw
        )
    return torch.from_numpy(mask.astype(np.uint8, copy=False))


def _image_file(cell: dict | None):
    """A file object for the bytes of a ``datasets.Image(decode=False)`` cell (or its local path)."""
    if cell is not None and cell.get("bytes") is not None:
        return io.BytesIO(cell["bytes"])
    if cell is not None and cell.get("path") and os.path.exists(cell["path"]):
        return open(cell["path"], "rb")
    raise ValueError("no bytes stored and no readable local path")


class SegmentationStream(torch.utils.data.IterableDataset):
    """Batches of one split of a segmentation dataset, for one process of a (possibly multi-process) run.

    Use it with ``make_dataloader`` (a DataLoader with ``batch_size=None`` whose workers build the parts
    of batches, joined in the main process), and do not pass it to ``accelerator.prepare``: each process
    already reads its own share. Each yielded batch is a dict:

    - ``pixel_values``: uint8 [B, C, H, W], the augmented (or resized) chips, *not* normalised; padding 0;
    - ``labels``: uint8 [B, H, W], 0/1 and 255 (ignore, also on padding);
    - ``pixel_normalization``: float32 [B, 3, C], each sample's colour jitter and normalisation
      ``(x * rescale_factor - mean) / std`` folded into three coefficients per band, ``scale``,
      ``grey_scale`` and ``offset`` (dim 1, in that order): ``normalised = pixel_values * scale +
      grey * grey_scale + offset``, ``grey`` the mean of the bands at each pixel (see
      ``transforms.apply_normalization``). One tensor rather than three: each tensor of a batch is a
      shared-memory segment to hand over from a worker, and a copy to the device;
    - ``record_index``: int64 [B], each record's position in the pass (training: ``t * W * B + r * B +
      slot`` for batch ``t`` of process ``r``; evaluation: the record's position in the split's files);
    - ``bad_samples``: list of ``BadSample`` met while building this batch; each was replaced by an
      all-ignore filler (``labels`` 255, ``pixel_values`` 0 and coefficients 0, so normalised to exactly
      0) so that batch shapes and step counts stay the same on every process;
    - ``records_read``: int, records the process (or workers) that built this batch fetched from storage
      since their previous parts: the read cost, summed over a pass.

    ``batch_to_model_inputs`` turns a batch into the model's inputs on a device: float32 normalised
    ``pixel_values`` and int64 ``labels`` (the module docstring says why batches are uint8 until then).

    Args:
        source: local folder in the Hub layout, or Hub dataset id.
        split: split name (``"train"``, ``"validation"``...).
        per_process_batch_size: records per batch on this process (``B``).
        training: shuffle, augment and drop what does not fill a step on every process; otherwise none
            of these.
        image_mean, image_std, rescale_factor: normalisation ``(x * rescale_factor - mean) / std`` per
            band, from the model's image processor; the number of bands is ``len(image_mean)``.
        process_index, num_processes: this process's rank and the number of processes (``W``).
        seed: seeds the shuffle (with the epoch) and the augmentation (with epoch and record index).
        buffer_batches: shuffle buffer size in batches: ``buffer_batches * B`` records per process,
            shared among its readers (``buffer_batches * B // R`` each).
        max_buffer_input_shards: whole-stream reading only: shards feeding the shuffle buffer at a time.
            Above 1, datasets 5.2 interleaves shards in threads and, for parquet, sleeps 5 s when each
            pass ends (a guard against apache/arrow#45214), so 1 is the default.
        crop_size_px: side of the square training crop; None keeps each chip's own size.
        scale_range: random scale factors for training, drawn uniformly.
        flips: random horizontal and vertical flips in training.
        color_jitter: brightness, contrast and saturation factors drawn in ``[1 - x, 1 + x]``.
        resize_to_px: evaluation only: resize chips to this side (or (height, width)) first.
        num_channels: expected number of image bands; a check against ``len(image_mean)``.
        on_bad_sample: ``"skip"`` (replace, count, log a warning) or ``"error"`` (raise ``BadSampleError``,
            a ``ValueError``, naming the record, or ``ShardReadError``, an ``OSError``, naming the file).
        readers_per_process: readers per process (``R``): the batches depend on it, not on the number
            of DataLoader workers; a number of workers that divides ``min(R, B)`` reads each record once.
        read_plan: ``"auto"`` (planned from parquet metadata when the split is parquet, else the whole
            stream with a warning), ``"parquet"`` (planned, or an error), ``"whole_stream"`` (every
            process and worker reads the whole stream: the older mechanism, kept for other formats and
            for comparison).

    Position: ``set_epoch`` picks the pass (it reseeds the shuffle), ``set_start_step`` skips steps of a
    pass; ``state_dict``/``load_state_dict`` save and restore both. The training loop counts the batches
    it has consumed itself, since DataLoader workers read ahead of it.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        split: str,
        *,
        per_process_batch_size: int,
        training: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        rescale_factor: float,
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
        buffer_batches: int = 64,
        max_buffer_input_shards: int = 1,
        crop_size_px: int | None = None,
        scale_range: tuple[float, float] = (0.75, 1.5),
        flips: bool = True,
        color_jitter: float = 0.1,
        resize_to_px: int | tuple[int, int] | None = None,
        num_channels: int | None = None,
        on_bad_sample: str = "skip",
        readers_per_process: int = DEFAULT_READERS_PER_PROCESS,
        read_plan: str = "auto",
    ):
        super().__init__()
        if per_process_batch_size < 1:
            raise ValueError(f"per_process_batch_size must be >= 1, got {per_process_batch_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        if buffer_batches < 1:
            raise ValueError(f"buffer_batches must be >= 1, got {buffer_batches}")
        if max_buffer_input_shards < 1:
            raise ValueError(f"max_buffer_input_shards must be >= 1, got {max_buffer_input_shards}")
        if crop_size_px is not None and crop_size_px < 1:
            raise ValueError(f"crop_size_px must be a positive number of pixels or None, got {crop_size_px}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(
                f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}"
            )
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        if num_channels is not None and num_channels != len(image_mean):
            raise ValueError(
                f"num_channels={num_channels} but image_mean has {len(image_mean)} values (one per band)"
            )
        if readers_per_process < 1:
            raise ValueError(f"readers_per_process must be >= 1, got {readers_per_process}")
        if read_plan not in READ_PLANS:
            raise ValueError(f"read_plan must be one of {READ_PLANS}, got {read_plan!r}")
        self.source = os.fspath(source)
        self.split = split
        self.per_process_batch_size = per_process_batch_size
        self.training = training
        self.process_index = process_index
        self.num_processes = num_processes
        self.seed = seed
        self.buffer_batches = buffer_batches
        self.max_buffer_input_shards = max_buffer_input_shards
        self.crop_size_px = crop_size_px
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flips = flips
        self.color_jitter = color_jitter
        self.resize_to_hw = (resize_to_px, resize_to_px) if isinstance(resize_to_px, int) else resize_to_px
        self.on_bad_sample = on_bad_sample
        self.readers_per_process = readers_per_process
        self.normalizer = Normalizer(image_mean, image_std, rescale_factor)
        self._epoch = 0
        self._start_step = 0
        self._num_records: int | None = None
        self._layout: SplitLayout | None = None
        self._plans: dict[int, PassPlan] = {}
        self._records = None
        files = None if read_plan == "whole_stream" else self._parquet_files()
        if files is not None:
            self._layout = read_layout(files, REQUIRED_COLUMNS, skip_unreadable=on_bad_sample == "skip")
            self._check_columns(self._layout.columns)
            self._log_plan()
            return
        if read_plan == "parquet":
            raise ValueError(f"{self.source} split {split!r} is not stored as parquet: it cannot be planned")
        if read_plan == "auto":
            logger.warning(
                "%s split %r is not stored as parquet: every process and DataLoader worker reads the whole "
                "stream (the read is amplified %d x the number of workers)",
                self.source, split, num_processes,
            )  # fmt: skip
        records = open_split(self.source, split, streaming=True).select_columns(list(REQUIRED_COLUMNS))
        # Records stay undecoded until a worker has chosen them: skipping a record costs no decoding.
        self._records = records.cast_column("image", datasets.Image(decode=False)).cast_column(
            "mask", datasets.Image(decode=False)
        )

    def _parquet_files(self) -> list[str] | None:
        try:
            return split_parquet_files(self.source, self.split)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
            raise _dataset_not_found(self.source, error) from error

    def _check_columns(self, columns: Sequence[str]) -> None:
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise ValueError(
                f"dataset {self.source!r} split {self.split!r} has no {' or '.join(repr(m) for m in missing)} "
                f"column: its columns are {list(columns)}; a segmentation dataset needs an 'image' and a "
                "'mask' column, both datasets.Image() features"
            )

    def _log_plan(self) -> None:
        """Say how the split is read, once per process (evaluation streams are built at each validation)."""
        plan = self._plan()
        num_readers = self.num_processes * self.readers_per_process
        text = describe(plan, self._layout, num_readers)
        key = (self.source, self.split, text)
        if key in _LOGGED_PLANS:
            return
        _LOGGED_PLANS.add(key)
        shared = plan.fetched_records > self._layout.num_records - plan.dropped_records
        (logger.warning if shared else logger.info)("%s split %r: %s", self.source, self.split, text)

    # ---- position -----------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start_step(self) -> int:
        return self._start_step

    def set_epoch(self, epoch: int) -> None:
        """Select pass ``epoch`` (the shuffle is reseeded with it). Moving to another epoch starts it at
        step 0; setting the current epoch again keeps the start step, so a restored position survives a
        loop that calls ``set_epoch`` before each pass."""
        if epoch != self._epoch:
            self._start_step = 0
        self._epoch = int(epoch)

    def set_start_step(self, step: int) -> None:
        """Start the next iteration at global step ``step`` of the current pass."""
        if step < 0:
            raise ValueError(f"start step must be >= 0, got {step}")
        self._start_step = int(step)

    def state_dict(self, batches_consumed: int = 0) -> dict[str, int]:
        """The position after ``batches_consumed`` batches of an iteration begun at the current position."""
        return {"epoch": self._epoch, "start_step": self._start_step + batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch = int(state["epoch"])
        self.set_start_step(state["start_step"])

    # ---- sizes --------------------------------------------------------------------------------------

    @property
    def records_per_step(self) -> int:
        """Records in one global step, all processes together."""
        return self.num_processes * self.per_process_batch_size

    @property
    def planned(self) -> bool:
        """Whether the split is read from a plan (each record once per pass), not as a whole stream."""
        return self._layout is not None

    @property
    def pass_plan(self) -> PassPlan | None:
        """The plan of the current pass (None when the split is read as a whole stream)."""
        return self._plan() if self.planned else None

    @property
    def skipped_files(self) -> list[tuple[str, str]]:
        """Files left out of every pass because they cannot be read (``on_bad_sample="skip"``), with why."""
        return list(self._layout.skipped_files) if self.planned else []

    @property
    def num_records(self) -> int:
        """Records in the split: from the parquet footers, else the dataset's metadata, else counted once
        by reading it undecoded."""
        if self.planned:
            return self._layout.num_records
        if self._num_records is None:
            split_info = (self._records.info.splits or {}).get(self.split)
            if split_info is not None and split_info.num_examples:
                self._num_records = int(split_info.num_examples)
            else:
                logger.info(
                    "%s split %r: counting records (the dataset card does not say)", self.source, self.split
                )
                tables = self._records.with_format("arrow").iter(batch_size=1000)
                self._num_records = sum(table.num_rows for table in tables)
        return self._num_records

    @property
    def steps_per_pass(self) -> int:
        """Global steps in a pass: complete ones in training, all in evaluation (the most batches any
        process yields)."""
        if self.planned:
            if self.training:
                return self._plan().steps
            return max(len(self._evaluation_schedule(rank)) for rank in range(self.num_processes))
        if self.training:
            return self.num_records // self.records_per_step
        return math.ceil(self.num_records / self.records_per_step)

    @property
    def batches_per_pass(self) -> int:
        """Batches this process yields in a full pass (fewer in evaluation for a process with less data)."""
        if self.training:
            return self.steps_per_pass
        if self.planned:
            return len(self._evaluation_schedule(self.process_index))
        mine = self.num_records - self.process_index * self.per_process_batch_size
        return max(0, math.ceil(mine / self.records_per_step))

    @property
    def dropped_remainder_records(self) -> int:
        """Records of a training pass left out so that every process runs the same whole number of steps
        (0 in evaluation)."""
        if not self.training:
            return 0
        if self.planned:
            return self._plan().dropped_records
        return self.num_records % self.records_per_step

    # ---- planned iteration ----------------------------------------------------------------------------

    def _plan(self) -> PassPlan:
        epoch = self._epoch if self.training else 0
        if epoch not in self._plans:
            self._plans = {
                epoch: plan_pass(
                    self._layout,
                    num_processes=self.num_processes,
                    readers_per_process=self.readers_per_process,
                    batch_size=self.per_process_batch_size,
                    training=self.training,
                    seed=self.seed,
                    epoch=epoch,
                )
            }
        return self._plans[epoch]

    def _evaluation_schedule(self, process_index: int) -> list[tuple[int, int]]:
        """(reader, its batch) of each batch of a process in an evaluation pass: round robin over the
        process's readers, skipping those that have run out."""
        plan, readers = self._plan(), self.readers_per_process
        counts = [
            math.ceil(plan.line_records(process_index * readers + j) / self.per_process_batch_size)
            for j in range(readers)
        ]
        return [(j, i) for i in range(max(counts, default=0)) for j in range(readers) if i < counts[j]]

    @property
    def parts_per_batch(self) -> int:
        """Parts a training batch is joined from (one per reader that gives it records: ``min(B, R)``);
        1 in evaluation and for whole-stream reading, whose batches are built whole."""
        if not (self.planned and self.training):
            return 1
        return min(self.per_process_batch_size, self.readers_per_process)

    def _planned_steps(
        self, keep: Callable[[int], bool]
    ) -> Iterator[tuple[list[tuple[int, int]], dict[str, Any]] | None]:
        """For each training step from the start step on, the parts of this process's batch that ``keep``
        accepts, built as one piece for ``join_parts`` (None when it keeps none): part ``j`` of step ``t``
        is item ``(t - start_step) * P + j``."""
        plan, readers_per_process = self._plan(), self.readers_per_process
        start, batch_size, parts = self._start_step, self.per_process_batch_size, self.parts_per_batch
        fetched = [0]  # records fetched since this worker's previous part
        readers: dict[int, _LineReader] = {}
        per_step = self.records_per_step
        for step in range(start, plan.steps):
            slots, records, record_indices, offset = [], [], [], 0
            for j in range(parts):
                size = part_size(step, j, batch_size, readers_per_process)
                if keep((step - start) * parts + j):
                    if j not in readers:
                        g = self.process_index * readers_per_process + j
                        readers[j] = _LineReader(self, plan, g, fetched)
                    part = readers[j].records(step)
                    first = step * per_step + self.process_index * batch_size + offset
                    slots.append((j, len(part)))
                    records += [record for _, record in part]
                    record_indices += range(first, first + len(part))
                offset += size
            if not slots:
                yield None
                continue
            # The parts this worker builds for the step, as one piece: one batch of their records.
            files_left_out = self._files_left_out(step == 0 and slots[0][0] == 0)
            yield slots, self._build_batch(records, record_indices, fetched, files_left_out)

    def _files_left_out(self, first_of_pass: bool) -> list[BadSample]:
        if not (first_of_pass and self.process_index == 0):
            return []
        return [BadSample("unreadable_file", -1, path) for path, _ in self._layout.skipped_files]

    def _planned_evaluation_batches(self, worker_id: int, num_workers: int) -> Iterator[dict[str, Any]]:
        plan, readers_per_process = self._plan(), self.readers_per_process
        fetched = [0]  # records fetched since this worker's previous batch
        readers: dict[int, _LineReader] = {}
        schedule = self._evaluation_schedule(self.process_index)
        for position, (j, i) in enumerate(schedule):
            if position < self._start_step or j % num_workers != worker_id:
                continue
            if j not in readers:
                g = self.process_index * readers_per_process + j
                readers[j] = _LineReader(self, plan, g, fetched)
            records = readers[j].records(i)
            yield self._build_batch(
                [record for _, record in records],
                [readers[j].split_position(p) for p, _ in records],
                fetched, self._files_left_out(position == 0),
            )  # fmt: skip

    def warn_if_workers_share_readers(self, num_workers: int) -> None:
        """Say so when ``num_workers`` workers of ``make_dataloader`` read some records more than once."""
        parts = self.parts_per_batch
        if self.planned and self.training and num_workers > 1 and math.gcd(num_workers, parts) < num_workers:
            logger.warning(
                "%s split %r: %d DataLoader workers for %d readers per process: each reader is read by %d "
                "workers (a number of workers that divides the readers that fill a batch, min(readers_per_process, "
                "batch size), reads each record once)",
                self.source, self.split, num_workers, parts, num_workers // math.gcd(num_workers, parts),
            )  # fmt: skip

    def iter_parts(self) -> Iterator[Any]:
        """What a DataLoader worker (or the main process, with no workers) hands over: in planned
        training one item per step, the piece (``join_parts``) of that step's batch it built, worker ``k``
        of ``n`` building the parts ``i`` with ``i % n == k`` (``StreamLoader`` joins the ``n`` pieces of a
        step into its batch); otherwise whole batches. Use ``make_dataloader``, which
        iterates this."""
        worker_id, num_workers = _worker()
        if not self.planned:
            return self._whole_stream_batches(worker_id, num_workers)
        if not self.training:
            return self._planned_evaluation_batches(worker_id, num_workers)
        steps = self._planned_steps(lambda item: item % num_workers == worker_id)
        if self.parts_per_batch == 1:  # a part is a whole batch: handed over as one
            return (piece[1] for piece in steps if piece)
        # One piece per step: a message per step and worker, four tensors each.
        return (piece or ([], {}) for piece in steps)

    # ---- whole-stream iteration (not parquet, or asked for) --------------------------------------------

    def _record_tables(self) -> Iterator[pa.Table]:
        """The pass as arrow tables of one global step each (the last one may be short)."""
        records = self._records.with_format("arrow")
        if self.training:
            records = records.shuffle(
                seed=self.seed,
                buffer_size=self.buffer_batches * self.per_process_batch_size,
                max_buffer_input_shards=self.max_buffer_input_shards,
            )
            records.set_epoch(self._epoch)  # last: datasets' transforms return copies at epoch 0
        # ``iter`` reads the whole stream even inside a DataLoader worker, where iterating the dataset
        # directly would give each worker a subset of the shards.
        return records.iter(batch_size=self.records_per_step)

    def _whole_stream_batches(self, worker_id: int, num_workers: int) -> Iterator[dict[str, Any]]:
        start = self._start_step
        batch_size, per_step = self.per_process_batch_size, self.records_per_step
        fetched = [0]
        for step, table in enumerate(self._record_tables()):
            fetched[0] += table.num_rows
            if step < start or (step - start) % num_workers != worker_id:
                continue
            if self.training and table.num_rows < per_step:
                logger.info(
                    "%s split %r epoch %d: %d records dropped, fewer than one global step of %d",
                    self.source, self.split, self._epoch, table.num_rows, per_step,
                )  # fmt: skip
                return
            mine = table.slice(self.process_index * batch_size, batch_size)
            if mine.num_rows == 0:
                return
            first = step * per_step + self.process_index * batch_size
            records = [
                _Record(_as_cell(image), _as_cell(mask), None)
                for image, mask in zip(mine.column("image").to_pylist(), mine.column("mask").to_pylist())
            ]
            yield self._build_batch(records, list(range(first, first + len(records))), fetched)

    # ---- batches --------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Whole batches. Through ``make_dataloader`` each DataLoader worker builds parts and each record
        is read once; a DataLoader given the stream itself makes each worker build whole batches from
        all readers (the same batches, read ``min(n, parts_per_batch)`` times over)."""
        parts = self.parts_per_batch
        if parts == 1:
            return self.iter_parts()
        worker_id, num_workers = _worker()
        if num_workers > 1 and worker_id == 0:
            logger.warning(
                "%s split %r is iterated by DataLoader workers directly: each worker reads every reader; "
                "make_dataloader(stream, num_workers) reads each record once",
                self.source, self.split,
            )  # fmt: skip
        steps = self._planned_steps(lambda item: (item // parts) % num_workers == worker_id)
        # A worker keeps whole steps here, so its piece is the batch, its parts already in reader order.
        return (piece[1] for piece in steps if piece)

    def _build_batch(
        self,
        records: Sequence[_Record | _UnreadableRecord],
        record_indices: Sequence[int],
        fetched: list[int],
        extra_bad_samples: Sequence[BadSample] = (),
    ) -> dict[str, Any]:
        """This process's batch from its undecoded records; ``fetched`` holds the records read since the
        previous batch, reset here."""
        samples: list[_Sample | None] = []
        bad_samples: list[BadSample] = list(extra_bad_samples)
        sizes_hw = []  # of every record whose size could be read, bad ones included
        for record, record_index in zip(records, record_indices):
            if isinstance(record, _UnreadableRecord):
                bad_samples.append(BadSample("unreadable_file", record_index, record.file))
                samples.append(None)
                continue
            try:
                samples.append(self._prepare_sample(record.image, record.mask, record_index))
                sizes_hw.append(tuple(samples[-1].mask.shape))
            except BadSampleError as error:
                key = (record.image or {}).get("path")
                where = f"{self.source} split {self.split!r} record {record_index} (key {key!r})"
                origin = f" in {record.origin}" if record.origin else ""
                if self.on_bad_sample == "error":
                    raise BadSampleError(
                        error.reason,
                        f"{where}: {error.detail} [{error.reason}]{origin}; pass on_bad_sample='skip' to skip "
                        "and count bad samples",
                    ) from error
                logger.warning("skipping %s: %s [%s]%s", where, error.detail, error.reason, origin)
                bad_samples.append(BadSample(error.reason, record_index, key))
                samples.append(None)
                if error.size_hw is not None:
                    sizes_hw.append(error.size_hw)

        if self.training and self.crop_size_px is not None:
            size_hw = (self.crop_size_px, self.crop_size_px)
        elif not self.training and self.resize_to_hw is not None:
            size_hw = tuple(self.resize_to_hw)
        elif sizes_hw:  # chips of several sizes: the largest, the others padded
            size_hw = (max(h for h, _ in sizes_hw), max(w for _, w in sizes_hw))
        else:
            size_hw = (FALLBACK_FILLER_SIZE_PX, FALLBACK_FILLER_SIZE_PX)

        count = len(samples)
        images = torch.zeros((count, self.normalizer.num_channels, *size_hw), dtype=torch.uint8)
        masks = torch.full((count, *size_hw), 255, dtype=torch.uint8)
        for slot, sample in enumerate(samples):
            if sample is not None:  # smaller chips (evaluation) sit top-left, padded with 0 and ignore
                height, width = sample.mask.shape
                images[slot, :, :height, :width] = sample.image
                masks[slot, :height, :width] = sample.mask
        normalization = self.normalizer.coefficients(
            images, [sample.jitter if sample else None for sample in samples]
        )
        for slot, sample in enumerate(samples):
            if sample is None:  # the filler: normalised to 0 (the mean colour), nothing to learn (all ignore)
                normalization[slot] = 0.0
        records_read, fetched[0] = fetched[0], 0
        return {
            "pixel_values": images,
            "labels": masks,
            "pixel_normalization": normalization,
            "record_index": torch.tensor(list(record_indices), dtype=torch.int64),
            "bad_samples": bad_samples,
            "records_read": records_read,
        }

    def _prepare_sample(self, image_cell: dict | None, mask_cell: dict | None, record_index: int) -> _Sample:
        """Decode and check one record, then augment it (training) or resize it (evaluation, if asked)."""
        image = decode_image(image_cell, self.normalizer.num_channels)
        mask = decode_mask(mask_cell, tuple(image.shape[-2:]))
        if not self.training:
            if self.resize_to_hw is not None:
                image, mask = resize_pair(image, mask, tuple(self.resize_to_hw))
            return _Sample(image, mask, None)
        crop_hw = (self.crop_size_px,) * 2 if self.crop_size_px is not None else tuple(mask.shape)
        augmentation = draw_augmentation(
            augmentation_generator(self.seed, self._epoch, record_index),
            *mask.shape,
            crop_size_hw=crop_hw,
            scale_range=self.scale_range,
            flips=self.flips,
            color_jitter=self.color_jitter,
        )
        image, mask = apply_geometry(image, mask, augmentation, crop_hw)
        return _Sample(image, mask, augmentation.jitter)


class _LineReader:
    """One reader's line of a pass: emits its records batch by batch (evaluation) or part by part
    (training) in the reader's order, fetching each row group when the first of its records still to
    come is needed, once; records of batches or parts passed over are never fetched."""

    def __init__(self, stream: SegmentationStream, plan: PassPlan, reader: int, fetched: list[int]):
        self.layout = stream._layout
        self.segments = plan.lines[reader]
        self.starts = list(itertools.accumulate((segment.num_rows for segment in self.segments), initial=0))
        batch_size, readers_per_process = stream.per_process_batch_size, stream.readers_per_process
        self.order = ReaderOrder.for_reader(
            self.starts[-1], training=stream.training, seed=stream.seed, epoch=stream.epoch, reader=reader,
            buffer_size=reader_buffer_size(stream.buffer_batches, batch_size, readers_per_process),
        )  # fmt: skip
        j = reader % readers_per_process
        self.size_of = (  # records of the reader's batch or part ``index``
            (lambda index: part_size(index, j, batch_size, readers_per_process))
            if stream.training else (lambda index: batch_size)
        )  # fmt: skip
        self.on_bad_sample = stream.on_bad_sample
        self.next_index = 0
        self.fetched = fetched
        self.cache: dict[int, _Record | _UnreadableRecord] = {}

    def records(self, index: int) -> list[tuple[int, _Record | _UnreadableRecord]]:
        """The records of this reader's batch (or, in training, part) ``index``, as (position in the line,
        record); earlier ones not yet emitted are passed over without data."""
        while self.next_index < index:
            for position in self._next_positions():
                self.cache.pop(position, None)
        positions = self._next_positions()
        wanted = set(positions)
        for position in positions:
            if position not in self.cache:
                self._fetch(position, wanted)
        return [(position, self.cache.pop(position)) for position in positions]

    def split_position(self, position: int) -> int:
        """The record's position in the split's files."""
        k = bisect.bisect_right(self.starts, position) - 1
        segment = self.segments[k]
        return segment.row_group.first_record + segment.start + position - self.starts[k]

    def _next_positions(self) -> list[int]:
        size = self.size_of(self.next_index)
        self.next_index += 1
        return list(itertools.islice(self.order, size))

    def _fetch(self, position: int, wanted: set[int]) -> None:
        """Read the segment holding ``position`` and keep its records still to come."""
        k = bisect.bisect_right(self.starts, position) - 1
        segment, base, end = self.segments[k], self.starts[k], self.starts[k + 1]
        keep = {p for p in self.order.buffered() if base <= p < end}
        keep.update(range(max(base, self.order.next_input), end))
        keep.update(p for p in wanted if base <= p < end)
        self.fetched[0] += segment.row_group.num_rows
        path = self.layout.files[segment.row_group.file_index]
        try:
            table = self.layout.read_segment(segment, REQUIRED_COLUMNS)
        except ShardReadError as error:
            if self.on_bad_sample == "error":
                raise ShardReadError(
                    f"{error}; pass on_bad_sample='skip' to skip and count its records"
                ) from error
            logger.warning("skipping %d records: %s", len(keep), error)
            for p in keep:
                self.cache[p] = _UnreadableRecord(path, str(error))
            return
        offsets = sorted(p - base for p in keep)
        rows = table.take(offsets) if len(offsets) < table.num_rows else table
        origin = f"{path} row group {segment.row_group.index}"
        for offset, image, mask in zip(
            offsets, rows.column("image").to_pylist(), rows.column("mask").to_pylist()
        ):
            self.cache[base + offset] = _Record(_as_cell(image), _as_cell(mask), origin)


def _as_cell(value: Any) -> dict | None:
    """A ``datasets.Image`` cell from an arrow value: the feature's struct, or bare image bytes."""
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    return value


def _dataset_not_found(source: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"cannot open dataset {source!r}: it is neither a local dataset folder nor a Hub dataset id "
        f"that can be reached ({error})"
    )


def batch_to_model_inputs(
    batch: dict[str, Any],
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's inputs from a ``SegmentationStream`` batch, on ``device``: ``pixel_values`` float32
    [B, C, H, W] normalised (colour jitter included) in ``memory_format``, and ``labels`` int64 [B, H, W].

    The uint8 tensors are copied to the device (asynchronously from pinned memory) and converted there,
    so a GPU receives a quarter of the float32 bytes; on the CPU this is the batch's only float pass.
    Deterministic: the same batch gives bitwise the same inputs on the same device.
    """
    images = batch["pixel_values"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    pixel_values = apply_normalization(images, batch["pixel_normalization"])
    labels = batch["labels"].to(device, non_blocking=True).to(torch.int64)
    return pixel_values, labels


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this, or (0, 1) outside one."""
    worker = torch.utils.data.get_worker_info()
    if worker is None:
        return 0, 1
    fsspec.asyn.reset_lock()  # as datasets does in workers: a forked fsspec event loop would hang
    return worker.id, worker.num_workers


def join_parts(
    pieces: Sequence[tuple[Sequence[tuple[int, int]], dict[str, Any]]], pin_memory: bool = False
) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Join pieces of one batch, each ``(slots, batch)``: ``slots`` lists the (reader, records) of the
    parts that make up the rows of ``batch``, in its row order. Returns ``(slots, batch)`` with the parts
    in reader order, whoever built them (chips of different sizes sit top-left, padded as a batch pads
    them), in pinned memory when asked, so that the copy to a GPU stays asynchronous."""
    rows = []  # (reader, piece, first row, records)
    for index, (slots, _) in enumerate(pieces):
        first = 0
        for reader, count in slots:
            rows.append((reader, index, first, count))
            first += count
    rows.sort(key=lambda row: row[0])
    slots = [(reader, count) for reader, _, _, count in rows]
    filled = [batch for piece_slots, batch in pieces if piece_slots]
    if len(filled) == 1 and not pin_memory and [i for _, i, _, _ in rows] == [0] * len(rows):
        return slots, filled[0]  # one piece, already in order: nothing to copy
    if not filled:
        return slots, {}
    channels = filled[0]["pixel_values"].shape[1]
    height = max(batch["pixel_values"].shape[2] for batch in filled)
    width = max(batch["pixel_values"].shape[3] for batch in filled)
    count = sum(count for _, count in slots)
    pixel_values = torch.zeros((count, channels, height, width), dtype=torch.uint8, pin_memory=pin_memory)
    labels = torch.full((count, height, width), 255, dtype=torch.uint8, pin_memory=pin_memory)
    normalization, record_index, position = [], [], 0
    for _, index, first, part_count in rows:
        batch = pieces[index][1]
        _, _, piece_height, piece_width = batch["pixel_values"].shape
        taken = slice(first, first + part_count)
        pixel_values[position : position + part_count, :, :piece_height, :piece_width] = batch[
            "pixel_values"
        ][taken]
        labels[position : position + part_count, :piece_height, :piece_width] = batch["labels"][taken]
        normalization.append(batch["pixel_normalization"][taken])
        record_index.append(batch["record_index"][taken])
        position += part_count
    bad_samples = [bad for batch in filled for bad in batch["bad_samples"]]
    return slots, {
        "pixel_values": pixel_values,
        "labels": labels,
        "pixel_normalization": torch.cat(normalization),
        "record_index": torch.cat(record_index),
        "bad_samples": sorted(bad_samples, key=lambda bad: bad.record_index),  # in record order
        "records_read": sum(batch["records_read"] for batch in filled),
    }


class _StreamParts(torch.utils.data.IterableDataset):
    """What the DataLoader of ``StreamLoader`` iterates: the stream's parts."""

    def __init__(self, stream: SegmentationStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.stream.iter_parts()


class StreamLoader:
    """A DataLoader over a stream's parts that yields its batches, each joined in the main process from
    the parts its workers built: each worker hands over one item per step holding its parts of that
    step's batch, and the DataLoader hands items over in order, round robin over its workers, so the
    items of a step come one after another (one message per worker and step, whatever the parts)."""

    def __init__(self, stream: SegmentationStream, **dataloader_options: Any):
        self.stream = stream
        self.parts_per_batch = stream.parts_per_batch
        # Joined batches are pinned once, when joined, rather than each part by the DataLoader first.
        self.pin_memory = bool(dataloader_options.get("pin_memory")) and torch.cuda.is_available()
        if self.parts_per_batch > 1:
            dataloader_options = {**dataloader_options, "pin_memory": False}
        self.dataloader = torch.utils.data.DataLoader(_StreamParts(stream), **dataloader_options)

    @property
    def dataset(self) -> SegmentationStream:
        return self.stream

    @property
    def num_workers(self) -> int:
        return self.dataloader.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = iter(self.dataloader)
        if self.parts_per_batch == 1:
            return items
        return self._joined(items)

    def _joined(
        self, items: Iterator[tuple[list[tuple[int, int]], dict[str, Any]]]
    ) -> Iterator[dict[str, Any]]:
        """Each step's pieces, one from each worker, joined into its batch in reader order."""
        per_step = max(1, self.dataloader.num_workers)
        while pieces := list(itertools.islice(items, per_step)):
            slots, batch = join_parts(pieces, self.pin_memory)
            if len(pieces) < per_step or [reader for reader, _ in slots] != list(range(self.parts_per_batch)):
                raise RuntimeError(
                    f"a batch lost parts: it has the parts of readers {[reader for reader, _ in slots]} of "
                    f"{self.parts_per_batch}"
                )
            yield batch


def make_dataloader(
    stream: SegmentationStream, num_workers: int = 0, **dataloader_kwargs: Any
) -> StreamLoader:
    """The loader of a ``SegmentationStream``: a DataLoader whose workers build parts of batches (each
    reader's records read by one worker), joined into the stream's batches in the main process.

    ``batch_size=None`` because the stream yields finished parts (it must: which records form a batch
    is decided by the global step layout, not by the loader). ``persistent_workers=False`` because
    workers copy the stream when an iteration starts: fresh workers for each iteration see the epoch and
    start step set just before it, where persistent ones would keep the first iteration's. Memory is
    pinned when CUDA is available, for asynchronous host-to-device copies.
    """
    options = {
        "batch_size": None,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": False,
    }
    options.update(dataloader_kwargs)
    stream.warn_if_workers_share_readers(options["num_workers"])
    return StreamLoader(stream, **options)
