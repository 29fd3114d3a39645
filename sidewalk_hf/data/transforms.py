"""Training augmentation and normalisation of image/mask pairs held as uint8 tensors.

Geometry (random scale, crop with padding, flips) runs on uint8 tensors: a crop of a rescaled chip is
computed as a resize of the matching source window, so no pixel outside the crop is ever resized, and the
image is never converted to float or to PIL on the way. Colour jitter is linear in the pixel values, so it
is folded into normalisation: ``Normalizer.coefficients`` describes the jitter and normalisation of each
sample as three float32 coefficients per band, and ``apply_normalization`` turns a uint8 batch into
float32 model input with them, once, wherever the batch is consumed (on the accelerator in training).

Randomness comes from a ``torch.Generator`` seeded by (seed, epoch, record index), never from global
state: a record gets the same augmentation whichever process or DataLoader worker builds it, and a resumed
run sees the same augmented samples as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_PAD_VALUE = 0
MASK_PAD_VALUE = 255  # the ignore value: padding adds nothing to the loss or the metrics


def augmentation_generator(seed: int, epoch: int, record_index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, record index), well mixed so that neighbouring records differ."""
    state = np.random.SeedSequence([seed, epoch, record_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


@dataclass(frozen=True)
class AxisPlan:
    """How one axis of a training crop is made: resize ``[source_start, source_start + source_length)`` of
    the chip to ``output_length`` pixels and place it ``pad_before`` pixels into the crop."""

    source_start: int
    source_length: int
    output_length: int
    pad_before: int


@dataclass(frozen=True)
class ColorJitter:
    """Multiplicative factors, 1.0 meaning unchanged, applied in torchvision's order."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


@dataclass(frozen=True)
class Augmentation:
    """Everything random about one training sample."""

    rows: AxisPlan
    cols: AxisPlan
    horizontal_flip: bool
    vertical_flip: bool
    jitter: ColorJitter


def _plan_axis(length: int, crop_length: int, scale: float, position: float) -> AxisPlan:
    """Scale an axis of ``length`` by ``scale``, then crop (or pad) it to ``crop_length``.

    ``position`` in [0, 1) picks the crop offset when the scaled axis is longer than the crop, and the
    padding offset when it is shorter.
    """
    scaled = max(1, round(length * scale))
    if scaled >= crop_length:
        offset = min(int(position * (scaled - crop_length + 1)), scaled - crop_length)
        source_length = min(length, max(1, round(crop_length / scale)))
        source_start = min(int(offset / scale), length - source_length)
        return AxisPlan(source_start, source_length, crop_length, 0)
    pad_before = min(int(position * (crop_length - scaled + 1)), crop_length - scaled)
    return AxisPlan(0, length, scaled, pad_before)


def draw_augmentation(
    generator: torch.Generator,
    height: int,
    width: int,
    *,
    crop_size_hw: tuple[int, int],
    scale_range: tuple[float, float],
    flips: bool = True,
    color_jitter: float = 0.1,
) -> Augmentation:
    """Draw a random scale in ``scale_range``, crop position, flips and jitter factors in
    ``[1 - color_jitter, 1 + color_jitter]``; the number and order of draws never changes."""
    u = torch.rand(8, generator=generator, dtype=torch.float64).tolist()
    low, high = scale_range
    scale = low + (high - low) * u[0]
    jitter = [1.0 + color_jitter * (2 * x - 1) for x in u[5:8]]
    return Augmentation(
        rows=_plan_axis(height, crop_size_hw[0], scale, u[1]),
        cols=_plan_axis(width, crop_size_hw[1], scale, u[2]),
        horizontal_flip=flips and u[3] < 0.5,
        vertical_flip=flips and u[4] < 0.5,
        jitter=ColorJitter(*jitter),
    )


def _nearest_indices(source_start: int, source_length: int, output_length: int, flip: bool) -> np.ndarray:
    """Source indices of a nearest-neighbour resize (pixel centres, like PIL and ``nearest-exact``)."""
    positions = (np.arange(output_length) + 0.5) * (source_length / output_length)
    indices = np.minimum(positions.astype(np.int64), source_length - 1) + source_start
    return indices[::-1] if flip else indices


def _take(mask: torch.Tensor, row_index: np.ndarray, col_index: np.ndarray) -> torch.Tensor:
    """``mask[row_index][:, col_index]``; numpy's ``take`` is several times faster than torch's gathers here."""
    return torch.from_numpy(np.take(np.take(mask.numpy(), row_index, axis=0), col_index, axis=1))


def _resize_image(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 [C, H, W] tensor, antialiased when shrinking (PIL's behaviour)."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image
    shrinking = size_hw[0] < image.shape[-2] or size_hw[1] < image.shape[-1]
    return F.interpolate(
        image[None], size=size_hw, mode="bilinear", align_corners=False, antialias=shrinking
    )[0]


def apply_geometry(
    image: torch.Tensor, mask: torch.Tensor, augmentation: Augmentation, crop_size_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale, crop/pad and flip a uint8 image [C, H, W] (bilinear) and mask [H, W] (nearest) together.

    Padding is ``IMAGE_PAD_VALUE`` in the image and ``MASK_PAD_VALUE`` (ignore) in the mask.
    """
    rows, cols = augmentation.rows, augmentation.cols
    window = image[
        :,
        rows.source_start : rows.source_start + rows.source_length,
        cols.source_start : cols.source_start + cols.source_length,
    ]
    resized = _resize_image(window, (rows.output_length, cols.output_length))
    flip_dims = [
        d for d, flip in ((-2, augmentation.vertical_flip), (-1, augmentation.horizontal_flip)) if flip
    ]
    if flip_dims:
        resized = resized.flip(flip_dims)
    # A flip mirrors the padding too: the window then sits as far from the far edge as it was from the near one.
    top = (
        crop_size_hw[0] - rows.output_length - rows.pad_before
        if augmentation.vertical_flip
        else rows.pad_before
    )
    left = (
        crop_size_hw[1] - cols.output_length - cols.pad_before
        if augmentation.horizontal_flip
        else cols.pad_before
    )
    if (rows.output_length, cols.output_length) == tuple(crop_size_hw):
        image_out = resized
    else:
        image_out = image.new_full((image.shape[0], *crop_size_hw), IMAGE_PAD_VALUE)
        image_out[:, top : top + rows.output_length, left : left + cols.output_length] = resized

    row_index = _nearest_indices(
        rows.source_start, rows.source_length, rows.output_length, augmentation.vertical_flip
    )
    col_index = _nearest_indices(
        cols.source_start, cols.source_length, cols.output_length, augmentation.horizontal_flip
    )
    resized_mask = _take(mask, row_index, col_index)
    if resized_mask.shape == tuple(crop_size_hw):
        return image_out, resized_mask
    mask_out = mask.new_full(crop_size_hw, MASK_PAD_VALUE)
    mask_out[top : top + rows.output_length, left : left + cols.output_length] = resized_mask
    return image_out, mask_out


def resize_pair(
    image: torch.Tensor, mask: torch.Tensor, size_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a uint8 image (bilinear) and its mask (nearest) to ``size_hw``, as for evaluation."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image, mask
    row_index = _nearest_indices(0, mask.shape[0], size_hw[0], flip=False)
    col_index = _nearest_indices(0, mask.shape[1], size_hw[1], flip=False)
    return _resize_image(image, size_hw), _take(mask, row_index, col_index)


NORMALIZATION_ROWS = ("scale", "grey_scale", "offset")


def apply_normalization(images: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """float32 model input from uint8 images [B, C, H, W] and their coefficients [B, 3, C] (rows
    ``NORMALIZATION_ROWS``, from ``Normalizer.coefficients``)::

        normalised[b, c] = x[b, c] * scale[b, c] + grey(x[b]) * grey_scale[b, c] + offset[b, c]

    with ``grey`` the plain mean of the bands at each pixel. On the images' device and in their memory
    format. The grey pass is left out when ``grey_scale`` is all 0, which is tested on the coefficients
    where they are given (host tensors: no device synchronisation)."""
    use_grey = bool(coefficients[:, 1].any())
    out = images.to(torch.float32)
    coefficients = coefficients.to(out.device, torch.float32, non_blocking=True)[..., None, None]
    scale, grey_scale, offset = coefficients.unbind(1)
    if not use_grey:
        return out.mul_(scale).add_(offset)
    grey = out.mean(1, keepdim=True)
    return out.mul_(scale).addcmul_(grey, grey_scale).add_(offset)


class Normalizer:
    """``(x * rescale_factor - mean) / std`` per band, from uint8 to float32, with optional colour jitter.

    The statistics come from the model's image processor, the single source of normalisation. Jitter
    follows torchvision's brightness, contrast, saturation (in that order) with "grey" the plain mean of
    the bands, since the bands need not be RGB (the reference imagery is NIR-G-B). The three steps
    compose into ``a * x + g * grey(x) + k`` per image, which is folded into the normalisation:
    ``coefficients`` computes the folded map per sample and band (cheap: the only pass over the pixels
    is an integer sum for the image mean that contrast needs), ``apply_normalization`` applies it, a few
    passes over the whole batch, wherever the batch is (the training stream hands uint8 batches and
    their coefficients over, and the consumer applies them on its device). Unlike torchvision,
    intermediate values are not clipped to [0, 255], a difference of a few grey levels at the extremes
    for mild jitter.
    """

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float], rescale_factor: float):
        if len(image_mean) != len(image_std):
            raise ValueError(f"image_mean has {len(image_mean)} bands but image_std has {len(image_std)}")
        if any(s <= 0 for s in image_std):
            raise ValueError(f"image_std must be positive, got {list(image_std)}")
        mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1)
        std = torch.tensor(image_std, dtype=torch.float32).view(1, -1)
        self.num_channels = len(image_mean)
        self.rescale_factor = float(rescale_factor)
        self._scale = self.rescale_factor / std
        self._shift = -mean / std

    def coefficients(
        self, images: torch.Tensor, jitters: Sequence[ColorJitter | None] | None = None
    ) -> torch.Tensor:
        """The folded map for uint8 images [B, C, H, W], jittering image ``i`` by ``jitters[i]`` if given:
        float32 [B, 3, C], rows ``NORMALIZATION_ROWS`` (see ``apply_normalization``)."""
        count = images.shape[0]
        jitters = list(jitters) if jitters is not None else [None] * count
        if len(jitters) != count:
            raise ValueError(f"{len(jitters)} jitters for {count} images")
        coefficients = torch.zeros(count, len(NORMALIZATION_ROWS), self.num_channels)
        if not any(j is not None and j != ColorJitter() for j in jitters):
            coefficients[:, 0], coefficients[:, 2] = self._scale, self._shift
            return coefficients
        factors = torch.tensor(
            [[j.brightness, j.contrast, j.saturation] if j is not None else [1.0, 1.0, 1.0] for j in jitters],
            dtype=torch.float32,
        )
        b, c, s = factors[:, 0:1], factors[:, 1:2], factors[:, 2:3]
        # The mean grey level of each image (contrast's pivot) is the mean of all its values: an exact
        # integer sum, in numpy, whose uint8 -> int64 sum is ten times faster than torch's.
        if bool((c != 1).any()):
            totals = images.reshape(count, -1).cpu().numpy().sum(axis=1, dtype=np.int64)
            mean_grey = (torch.from_numpy(totals).double() / images[0].numel()).to(torch.float32)[:, None]
        else:
            mean_grey = torch.zeros(count, 1)
        a, g, k = s * c * b, (1 - s) * c * b, (1 - c) * b * mean_grey
        coefficients[:, 0], coefficients[:, 1], coefficients[:, 2] = (
            a * self._scale,
            g * self._scale,
            k * self._scale + self._shift,
        )
        return coefficients

    def __call__(
        self, images: torch.Tensor, jitters: Sequence[ColorJitter | None] | None = None
    ) -> torch.Tensor:
        """Normalise uint8 images [B, C, H, W] to float32, jittering image ``i`` by ``jitters[i]`` if given."""
        return apply_normalization(images, self.coefficients(images, jitters))
