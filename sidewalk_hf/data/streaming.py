"""Streaming a segmentation split into ready batches, identically on every process and DataLoader worker.

``SegmentationStream`` is a torch ``IterableDataset`` that yields whole batches. Every process, and every
DataLoader worker of every process, reads the same stream of *undecoded* records: the split opened with
``datasets.load_dataset(..., streaming=True)`` and, in training, buffer-shuffled by ``datasets`` itself
with the same seed and epoch everywhere. The stream is cut into global steps of ``W * B`` records (``W``
processes, ``B`` records per process): step ``s`` is records ``[s * W * B, (s + 1) * W * B)``, process
``r`` takes ``[r * B, (r + 1) * B)`` of it, and DataLoader worker ``k`` of ``n`` decodes only the steps
with ``(s - start_step) % n == k``, passing over the others without decoding them. So, with no
communication between processes:

- every record is used once per pass across all processes;
- every process runs the same number of training steps (the last incomplete global step of a training
  pass is dropped, and counted: an uneven last batch would hang DDP);
- the DataLoader's in-order round robin over workers yields steps ``start_step, start_step + 1, ...``
  whatever ``num_workers`` is, so batches do not depend on the number of workers;
- resuming is exact: ``set_start_step(n)`` passes over ``n`` steps of undecoded records.

Each process reads the whole stream, and so does each of its workers; only decoding and augmentation are
divided. That trades read bandwidth for exactness, since undecoded records are cheap next to decoding.
This is also why the stream must not go through ``accelerator.prepare`` (which would shard it again) and
why ``datasets.distributed.split_dataset_by_node`` is not used: its per-node example counts differ when
shards differ in size.

In evaluation nothing is shuffled or dropped: the last batch may be short, and a process with no record in
the last step yields one batch fewer; evaluation has no per-step collective.

Batches are compact: uint8 images (augmented, not normalised) and uint8 labels, with each sample's colour
jitter and normalisation as three float32 coefficients per band. The consumer calls
``batch_to_model_inputs`` to get float32 normalised images and int64 labels on its device. Handing float32
and int64 batches from the workers to the main process costs more than decoding the chips, and copying
them to a GPU moves four (images) and eight (labels) times the bytes of uint8.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import datasets
import fsspec.asyn
import numpy as np
import pyarrow as pa
import torch
import torch.utils.data
from PIL import Image

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
)
LABEL_VALUES = (0, 1, 255)  # background, sidewalk, ignore
FALLBACK_FILLER_SIZE_PX = 32  # side of the fillers of a batch in which no record's size could be read
_IS_LABEL_VALUE = np.isin(np.arange(256), LABEL_VALUES)


class BadSample(NamedTuple):
    """A record replaced by an all-ignore filler: ``reason`` is one of ``BAD_SAMPLE_REASONS``,
    ``record_index`` the record's position in the pass, ``key`` its image path when the dataset has one."""

    reason: str
    record_index: int
    key: str | None


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
        raise FileNotFoundError(
            f"cannot open dataset {source!r}: it is neither a local dataset folder nor a Hub dataset id "
            f"that can be reached ({error})"
        ) from error
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

    Use it with ``make_dataloader`` (a DataLoader with ``batch_size=None``), and do not pass it to
    ``accelerator.prepare``: each process already reads its own share. Each yielded batch is a dict:

    - ``pixel_values``: uint8 [B, C, H, W], the augmented (or resized) chips, *not* normalised; padding 0;
    - ``labels``: uint8 [B, H, W], 0/1 and 255 (ignore, also on padding);
    - ``pixel_normalization``: float32 [B, 3, C], each sample's colour jitter and normalisation
      ``(x * rescale_factor - mean) / std`` folded into three coefficients per band, ``scale``,
      ``grey_scale`` and ``offset`` (dim 1, in that order): ``normalised = pixel_values * scale +
      grey * grey_scale + offset``, ``grey`` the mean of the bands at each pixel (see
      ``transforms.apply_normalization``). One tensor rather than three: each tensor of a batch is a
      shared-memory segment to hand over from a worker, and a copy to the device;
    - ``record_index``: int64 [B], each record's position in the pass (the shuffled order in training);
    - ``bad_samples``: list of ``BadSample`` met while building this batch; each was replaced by an
      all-ignore filler (``labels`` 255, ``pixel_values`` 0 and coefficients 0, so normalised to exactly
      0) so that batch shapes and step counts stay the same on every process.

    ``batch_to_model_inputs`` turns a batch into the model's inputs on a device: float32 normalised
    ``pixel_values`` and int64 ``labels`` (the module docstring says why batches are uint8 until then).

    Args:
        source: local folder in the Hub layout, or Hub dataset id.
        split: split name (``"train"``, ``"validation"``...).
        per_process_batch_size: records per batch on this process (``B``).
        training: shuffle, augment and drop the incomplete last global step; otherwise none of these.
        image_mean, image_std, rescale_factor: normalisation ``(x * rescale_factor - mean) / std`` per
            band, from the model's image processor; the number of bands is ``len(image_mean)``.
        process_index, num_processes: this process's rank and the number of processes (``W``).
        seed: seeds the shuffle (with the epoch) and the augmentation (with epoch and record index).
        buffer_batches: shuffle buffer size in batches: ``buffer_batches * B`` records.
        max_buffer_input_shards: shards feeding the shuffle buffer at a time. Above 1, datasets 5.2
            interleaves shards in threads and, for parquet, sleeps 5 s when each pass ends (a guard
            against apache/arrow#45214), so 1 is the default; raise it for data sorted by shard.
        crop_size_px: side of the square training crop; None keeps each chip's own size.
        scale_range: random scale factors for training, drawn uniformly.
        flips: random horizontal and vertical flips in training.
        color_jitter: brightness, contrast and saturation factors drawn in ``[1 - x, 1 + x]``.
        resize_to_px: evaluation only: resize chips to this side (or (height, width)) first.
        num_channels: expected number of image bands; a check against ``len(image_mean)``.
        on_bad_sample: ``"skip"`` (replace, count, log a warning) or ``"error"`` (raise ``BadSampleError``,
            a ``ValueError``, naming the record).

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
        self.normalizer = Normalizer(image_mean, image_std, rescale_factor)
        self._epoch = 0
        self._start_step = 0
        self._num_records: int | None = None
        records = open_split(self.source, split, streaming=True).select_columns(list(REQUIRED_COLUMNS))
        # Records stay undecoded until a worker has chosen them: skipping a record costs no decoding.
        self._records = records.cast_column("image", datasets.Image(decode=False)).cast_column(
            "mask", datasets.Image(decode=False)
        )

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
    def num_records(self) -> int:
        """Records in the split: from the dataset's metadata, else counted once by reading it undecoded."""
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
        """Global steps in a pass: complete ones in training, all in evaluation."""
        if self.training:
            return self.num_records // self.records_per_step
        return math.ceil(self.num_records / self.records_per_step)

    @property
    def batches_per_pass(self) -> int:
        """Batches this process yields in a full pass (fewer in evaluation for a process left without data)."""
        if self.training:
            return self.steps_per_pass
        mine = self.num_records - self.process_index * self.per_process_batch_size
        return max(0, math.ceil(mine / self.records_per_step))

    @property
    def dropped_remainder_records(self) -> int:
        """Records of a training pass left out because they do not fill a global step (0 in evaluation)."""
        return self.num_records % self.records_per_step if self.training else 0

    # ---- iteration ----------------------------------------------------------------------------------

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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if worker is not None:
            fsspec.asyn.reset_lock()  # as datasets does in workers: a forked fsspec event loop would hang
        start = self._start_step
        batch_size, per_step = self.per_process_batch_size, self.records_per_step
        for step, table in enumerate(self._record_tables()):
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
            yield self._build_batch(
                mine, first_record_index=step * per_step + self.process_index * batch_size
            )

    def _build_batch(self, table: pa.Table, first_record_index: int) -> dict[str, Any]:
        """This process's batch of one global step, from its undecoded records."""
        images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
        samples: list[_Sample | None] = []
        bad_samples: list[BadSample] = []
        sizes_hw = []  # of every record whose size could be read, bad ones included
        for offset, (image_cell, mask_cell) in enumerate(zip(images, masks)):
            record_index = first_record_index + offset
            try:
                samples.append(self._prepare_sample(image_cell, mask_cell, record_index))
                sizes_hw.append(tuple(samples[-1].mask.shape))
            except BadSampleError as error:
                key = (image_cell or {}).get("path")
                where = f"{self.source} split {self.split!r} record {record_index} (key {key!r})"
                if self.on_bad_sample == "error":
                    raise BadSampleError(
                        error.reason,
                        f"{where}: {error.detail} [{error.reason}]; pass on_bad_sample='skip' to skip and count bad samples",
                    ) from error
                logger.warning("skipping %s: %s [%s]", where, error.detail, error.reason)
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
        return {
            "pixel_values": images,
            "labels": masks,
            "pixel_normalization": normalization,
            "record_index": torch.arange(first_record_index, first_record_index + count, dtype=torch.int64),
            "bad_samples": bad_samples,
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


def make_dataloader(
    stream: SegmentationStream, num_workers: int = 0, **dataloader_kwargs: Any
) -> torch.utils.data.DataLoader:
    """The DataLoader for a ``SegmentationStream``.

    ``batch_size=None`` because the stream yields finished batches (it must: which records form a batch
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
    return torch.utils.data.DataLoader(stream, **options)
