"""Sidewalk IoU: evaluate's `mean_iou`, computed from a confusion matrix accumulated batch by batch.

This file is a self-contained `evaluate` module (`evaluate.load("<path>/sidewalk_iou")` works offline), so it
imports nothing from the package it ships with. evaluate reads its imports with a regular expression: keep one
import per line.
"""

import itertools
import sys
import warnings

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = """\
Intersection over union of semantic segmentation maps, with the inputs and output keys of evaluate's
`mean_iou`, computed from a confusion matrix that is accumulated batch by batch.

`mean_iou` stores every prediction and reference (PNG-encoded in an Arrow cache) until `compute`. This module
keeps one small matrix of counts instead, on the device the maps live on, so memory does not grow with the
number of images, and it sums that matrix across processes once, at `compute(accelerator=...)`. The numbers are
those of `mean_iou` (evaluate 0.4.6), pixel for pixel:

- pixels whose reference equals `ignore_index` are dropped;
- a reference value outside [0, num_labels) that is not `ignore_index` adds nothing to any class's reference
  area, but the prediction at that pixel still counts in the predicted area of its class;
- a prediction value outside [0, num_labels) counts in no class's predicted area;
- IoU and accuracy are dataset-level ratios of summed areas; a class absent from both predictions and
  references has NaN IoU and is left out of `mean_iou` (a nanmean);
- `nan_to_num` replaces NaN in every output after the means are taken.

Since counts are accumulated as batches arrive, `num_labels`, `ignore_index`, `label_map` and `reduce_labels`
must be known before the first batch: give them to `evaluate.load(...)`, to `add_batch`, or to `compute`
together with the maps. `compute` resets the accumulated counts, as with every evaluate module.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`torch.Tensor`, `np.ndarray` or list of 2-D maps):
        Predicted class ids: one (height, width) map, a (batch, height, width) stack, or a list of maps whose
        sizes may differ. Integer or boolean dtype; torch tensors may be on any device.
    references (same kinds as `predictions`):
        Ground-truth class ids, same shapes as `predictions`.
    num_labels (`int`):
        Number of classes.
    ignore_index (`int`):
        Reference value of pixels that are left out. Required, as in `mean_iou`.
    nan_to_num (`int` or `float`, *optional*):
        Replaces NaN in the outputs (classes absent from predictions and references), after the means.
    label_map (`dict[int, int]`, *optional*):
        Old id -> new id, applied to references one entry after the other (as `mean_iou` writes it; evaluate
        0.4.6 itself raises on a non-empty map).
    reduce_labels (`bool`, *optional*, defaults to `False`):
        ADE20k style, where 0 means "no label": references 0 become 255, every other value but 255 is decreased
        by one. Use it with `ignore_index=255`.
    id2label (`dict[int, str]`, *optional*):
        Class names for the named outputs; defaults to {0: "background", 1: "sidewalk"} for two classes and
        "class_<i>" otherwise.
    accelerator (`accelerate.Accelerator`, *optional*, `compute` only):
        When given, the counts of all processes are summed with `accelerator.reduce(counts, "sum")` before the
        metrics are derived. Every process must call `compute`, and every process gets the same result.

Returns:
    `dict`:
        mean_iou (`float`): mean over classes of the per-class IoU, NaN classes left out.
        mean_accuracy (`float`): mean over classes of the per-class accuracy (recall), NaN classes left out.
        overall_accuracy (`float`): correctly predicted pixels / labelled pixels.
        per_category_iou (`np.ndarray` of shape (num_labels,)): IoU of each class.
        per_category_accuracy (`np.ndarray` of shape (num_labels,)): accuracy of each class.
        <name>_iou (`float`): IoU of each class under its id2label name, e.g. background_iou, sidewalk_iou.
        pixel_accuracy (`float`): the same number as overall_accuracy, under the name this task reports.
        confusion_matrix (`np.ndarray` of shape (num_labels, num_labels), int64): pixels of reference class i
            predicted as class j, labelled pixels with in-range values only.

Examples:

    >>> import numpy as np
    >>> sidewalk_iou = evaluate.load("path/to/sidewalk_iou")
    >>> predictions = np.array([[1, 1], [0, 0]])
    >>> references = np.array([[1, 0], [0, 255]])
    >>> results = sidewalk_iou.compute(predictions=predictions, references=references, num_labels=2, ignore_index=255)
    >>> float(results["mean_iou"]), float(results["sidewalk_iou"])
    (0.5, 0.5)
"""

_CITATION = """\
@software{evaluate_mean_iou,
  title = {Mean IoU, a metric of the Hugging Face evaluate library},
  url = {https://huggingface.co/spaces/evaluate-metric/mean_iou},
}
"""

_TASK_ID2LABEL = {0: "background", 1: "sidewalk"}
_SETTINGS = ("num_labels", "ignore_index", "label_map", "reduce_labels")
_MEAN_IOU_KEYS = (
    "mean_iou",
    "mean_accuracy",
    "overall_accuracy",
    "per_category_iou",
    "per_category_accuracy",
)
_FIXED_KEYS = _MEAN_IOU_KEYS + ("pixel_accuracy", "confusion_matrix")
# On CPUs the maps are counted in slices of about this many bytes of input: the temporaries stay cache-sized and
# are reused by the allocator instead of being page-faulted in afresh for every batch.
_CPU_SLICE_BYTES = 1 << 21
# `_sum_of_small` adds up to 127 rows of 8-byte words without carries between the byte lanes (127 * 2 < 256).
_SUM_ROWS = 127
_SUM_BLOCK = 8 * _SUM_ROWS
# Two classes on a CPU (`_count_two_classes`) are counted in blocks of about this many bytes of the wider input
# (a whole number of `_SUM_BLOCK` pixels): an int64 block read from memory by its check is still in cache when it
# is narrowed to uint8, and so are the uint8 temporaries when they are counted.
_TWO_CLASS_BLOCK_BYTES = 1 << 21


class SidewalkIoU(evaluate.Metric):
    """`mean_iou` with constant memory: see the module description for the contract.

    Args:
        num_labels, ignore_index, label_map, reduce_labels: as in `compute`; given here, they hold for every batch.
        id2label (`dict[int, str]`, *optional*): class names for the named outputs.
        device (`torch.device` or `str`, *optional*): where the counts live; defaults to the device of the first
            tensor added (the CPU for numpy input).
        **kwargs: evaluate's module arguments (`experiment_id`, `cache_dir`, ...). `num_process` must stay 1:
            processes are combined with `compute(accelerator=...)`, not through evaluate's shared cache files.
    """

    def __init__(
        self,
        num_labels=None,
        ignore_index=None,
        label_map=None,
        reduce_labels=None,
        id2label=None,
        device=None,
        **kwargs,
    ):
        if kwargs.get("num_process", 1) != 1:
            raise ValueError(
                f"num_process={kwargs['num_process']}: sidewalk_iou combines processes by summing confusion "
                "matrices; create one module per process and call compute(accelerator=accelerator)"
            )
        super().__init__(**kwargs)
        self._init_settings = _checked_settings(
            {
                "num_labels": num_labels,
                "ignore_index": ignore_index,
                "label_map": label_map,
                "reduce_labels": reduce_labels,
            }
        )
        self._init_id2label = id2label
        self._device = torch.device(device) if device is not None else None
        self.reset()

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def __len__(self):
        """Number of maps added since the last `compute` or `reset`, on this process."""
        return self._num_maps

    def reset(self):
        """Forget the accumulated counts and the settings they were counted with."""
        self._settings = None
        self._counts = None
        self._num_maps = 0
        self._workspace = _Workspace()

    def add_batch(self, *, predictions=None, references=None, **settings):
        """Count a batch of predicted and reference maps into the confusion matrix.

        `settings` are `num_labels`, `ignore_index`, `label_map`, `reduce_labels`; each one given here, at
        construction, or at an earlier `add_batch` must agree with the others.
        """
        prediction_maps, reference_maps = _paired_maps(predictions, references)
        resolved = self._resolve_settings(settings, require_all=True)
        if self._counts is None:
            self._settings = resolved
            device = self._device
            if device is None:
                device = prediction_maps[0].device if prediction_maps else torch.device("cpu")
            self._counts = torch.zeros((resolved["num_labels"] + 1,) * 2, dtype=torch.int64, device=device)
        self._counts += _count_maps(
            prediction_maps, reference_maps, self._counts.device, self._settings, self._workspace
        )
        self._num_maps += _num_maps(reference_maps)

    def add(self, *, prediction=None, reference=None, **settings):
        """Count one predicted map and its reference map."""
        self.add_batch(predictions=[prediction], references=[reference], **settings)

    def compute(
        self,
        *,
        predictions=None,
        references=None,
        nan_to_num=None,
        id2label=None,
        accelerator=None,
        **settings,
    ):
        """Add the given maps, if any, sum the counts across processes when `accelerator` is given, and derive
        the metrics; the counts are reset afterwards."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references, **settings)
        resolved = self._resolve_settings(settings, require_all=False)
        num_labels = resolved["num_labels"]
        if num_labels is None:
            raise ValueError(
                "num_labels is unknown: nothing was added and compute() was not given num_labels"
            )
        counts = self._counts
        if counts is None:
            counts = torch.zeros((num_labels + 1,) * 2, dtype=torch.int64, device=self._device or "cpu")
        if accelerator is not None:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
        names = _label_names(id2label if id2label is not None else self._init_id2label, num_labels)
        self.reset()
        return _metrics_from_counts(counts.cpu().numpy(), names, nan_to_num)

    def _compute(
        self,
        *,
        predictions=None,
        references=None,
        num_labels=None,
        ignore_index=None,
        nan_to_num=None,
        label_map=None,
        reduce_labels=False,
        id2label=None,
    ):
        """The stateless form: the metrics of exactly these maps, as `mean_iou._compute` gives them."""
        settings = _checked_settings(
            {
                "num_labels": num_labels,
                "ignore_index": ignore_index,
                "label_map": label_map,
                "reduce_labels": reduce_labels,
            }
        )
        missing = [name for name in ("num_labels", "ignore_index") if settings[name] is None]
        if missing:
            raise TypeError(f"_compute() missing required argument(s): {missing}")
        counts = _count_maps(*_paired_maps(predictions, references), torch.device("cpu"), settings)
        return _metrics_from_counts(counts.numpy(), _label_names(id2label, num_labels), nan_to_num)

    def _resolve_settings(self, given, require_all):
        unknown = sorted(set(given) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; valid ones are {list(_SETTINGS)}")
        given = _checked_settings({name: given.get(name) for name in _SETTINGS})
        resolved = {}
        for name in _SETTINGS:
            sources = [
                (source, values[name])
                for source, values in (
                    ("the module's construction", self._init_settings),
                    ("the batches already added", self._settings or {}),
                    ("this call", given),
                )
                if values.get(name) is not None
            ]
            for (source, value), (other_source, other_value) in itertools.pairwise(sources):
                if value != other_value:
                    raise ValueError(
                        f"{name}={other_value!r} in {other_source} contradicts {name}={value!r} in {source}; "
                        "the counts are accumulated under one setting (call reset() to start over)"
                    )
            resolved[name] = sources[0][1] if sources else None
        if require_all:
            missing = [name for name in ("num_labels", "ignore_index") if resolved[name] is None]
            if missing:
                raise ValueError(
                    f"{' and '.join(missing)} must be known before maps are counted: pass them to evaluate.load(), "
                    "to add_batch() or to compute() (ignore_index is required, as in mean_iou)"
                )
        resolved["reduce_labels"] = bool(resolved["reduce_labels"])
        return resolved


def _checked_settings(settings):
    num_labels = settings.get("num_labels")
    if num_labels is not None and (
        isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
    ):
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    ignore_index = settings.get("ignore_index")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    label_map = settings.get("label_map")
    if label_map is not None:
        if not isinstance(label_map, dict) or not all(
            isinstance(key, int) and isinstance(value, int) for key, value in label_map.items()
        ):
            raise ValueError(f"label_map must be a dict of int -> int, got {label_map!r}")
        settings = {**settings, "label_map": dict(label_map) or None}
    return settings


def _paired_maps(predictions, references):
    """Both inputs as lists of (H, W) maps or (B, H, W) stacks, paired one to one."""
    prediction_maps = _as_maps(predictions, "predictions")
    reference_maps = _as_maps(references, "references")
    if [m.dim() for m in prediction_maps] != [m.dim() for m in reference_maps]:
        prediction_maps, reference_maps = _unstacked(prediction_maps), _unstacked(reference_maps)
    if len(prediction_maps) != len(reference_maps):
        raise ValueError(
            f"Mismatch in the number of predictions ({_num_maps(prediction_maps)}) and references "
            f"({_num_maps(reference_maps)})"
        )
    return prediction_maps, reference_maps


def _as_maps(values, name):
    """A list of tensors of shape (H, W) or (B, H, W), integer dtype, not copied when the input allows it."""
    if values is None:
        raise ValueError(f"{name} is missing")
    if isinstance(values, (list, tuple)):
        maps = [_as_integer_tensor(value, f"{name}[{index}]") for index, value in enumerate(values)]
        for index, value in enumerate(maps):
            if value.dim() != 2:
                raise ValueError(
                    f"{name}[{index}] must be a 2-D (height, width) map, got shape {tuple(value.shape)}"
                )
        return maps
    tensor = _as_integer_tensor(values, name)
    if tensor.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be a (height, width) map, a (batch, height, width) stack or a list of maps, "
            f"got shape {tuple(tensor.shape)}"
        )
    return [tensor]


def _unstacked(maps):
    return [single for value in maps for single in (value.unbind(0) if value.dim() == 3 else (value,))]


def _num_maps(maps):
    return sum(value.shape[0] if value.dim() == 3 else 1 for value in maps)


def _count_maps(prediction_maps, reference_maps, device, settings, workspace=None):
    counts = None
    for index, (prediction, reference) in enumerate(zip(prediction_maps, reference_maps)):
        if tuple(prediction.shape) != tuple(reference.shape):
            where = "" if len(prediction_maps) == 1 else f"[{index}]"
            raise ValueError(
                f"predictions{where} has shape {tuple(prediction.shape)} but references{where} has shape "
                f"{tuple(reference.shape)}; each prediction must have the size of its reference"
            )
        map_counts = _count_confusion(
            prediction.to(device, non_blocking=True),
            reference.to(device, non_blocking=True),
            **settings,
            workspace=workspace,
        )
        counts = map_counts if counts is None else counts + map_counts
    if counts is None:
        counts = torch.zeros((settings["num_labels"] + 1,) * 2, dtype=torch.int64, device=device)
    return counts


def _as_integer_tensor(value, name):
    if not isinstance(value, torch.Tensor):
        array = np.asarray(value)
        if array.dtype.kind == "b":
            array = array.view(np.uint8)
        elif array.dtype.kind == "u" and array.dtype != np.uint8:
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise TypeError(
                f"{name} must hold integer class ids, got dtype {array.dtype}; take the argmax of logits first"
            )
        if not array.flags.writeable:
            array = array.copy()
        value = torch.from_numpy(array)
    if value.dtype == torch.bool:
        value = value.view(torch.uint8)
    if value.is_floating_point() or value.is_complex():
        raise TypeError(
            f"{name} must hold integer class ids, got {value.dtype}; take the argmax of logits first"
        )
    return value


def _count_confusion(
    prediction, reference, num_labels, ignore_index, label_map=None, reduce_labels=False, *, workspace=None
):
    """(num_labels + 1) x (num_labels + 1) counts of (reference, prediction) pixel pairs.

    Row and column `num_labels` collect values outside [0, num_labels); pixels whose reference is
    `ignore_index` (after `label_map` and `reduce_labels`) are not counted at all.
    """
    if label_map or reduce_labels:
        reference = reference.to(torch.int64, copy=True)
        for old_id, new_id in (label_map or {}).items():
            reference[reference == old_id] = new_id
        if reduce_labels:
            reference[reference == 0] = 255
            reference -= 1
            reference[reference == 254] = 255
    workspace = workspace if workspace is not None else _Workspace()
    prediction = _as_countable(prediction.reshape(-1))
    reference = _as_countable(reference.reshape(-1))
    if num_labels == 2 and ignore_index not in (0, 1) and reference.device.type == "cpu":
        return _count_two_classes(prediction, reference, ignore_index, workspace)
    return _count_histogram(prediction, reference, num_labels, ignore_index, workspace)


def _count_histogram(prediction, reference, num_labels, ignore_index, workspace):
    """`_count_confusion` of flat uint8 or int64 maps, for any number of classes: a histogram of pair keys."""
    slice_pixels = max(reference.numel(), 1)
    if reference.device.type == "cpu":
        slice_pixels = _CPU_SLICE_BYTES // max(prediction.element_size(), reference.element_size())
    num_keys = (num_labels + 2) * (num_labels + 1)
    key_counts = torch.zeros(num_keys, dtype=torch.int64, device=reference.device)
    for start in range(0, reference.numel(), slice_pixels):
        stop = start + slice_pixels
        keys = _pair_keys(prediction[start:stop], reference[start:stop], num_labels, ignore_index, workspace)
        key_counts += _bincount_keys(keys, num_keys)
    # Row 0 holds the ignored pixels.
    return key_counts.view(num_labels + 2, num_labels + 1)[1:]


def _count_two_classes(prediction, reference, ignore_index, workspace):
    """`_count_confusion` of flat uint8 or int64 CPU maps with two classes, without a histogram where possible.

    Block by block: when the predictions are 0 or 1 and the references 0, 1 or `ignore_index`, the maps are taken
    as uint8 (int64 ones are narrowed once their values are checked) and `_two_class_counts` derives the 2 x 2
    matrix from a few vectorised passes. A block holding any other value is counted by the general histogram,
    which gives such values the meaning `mean_iou` gives them. Ignored pixels are recognised this way only when
    `ignore_index` is 255; with another `ignore_index` (never 0 or 1 here) only blocks whose references are all 0
    or 1, such as blocks without ignored pixels, avoid the histogram.
    """
    ignore_255 = ignore_index == 255
    prediction, reference = prediction.contiguous(), reference.contiguous()  # a flat view may be strided
    prediction_array, reference_array = prediction.numpy(), reference.numpy()
    block_pixels = _two_class_block_pixels(max(prediction_array.itemsize, reference_array.itemsize))
    totals = (0, 0, 0, 0)
    counts = None
    for start in range(0, reference.numel(), block_pixels):
        stop = start + block_pixels
        counted = None
        prediction_bytes = _as_bytes(prediction_array[start:stop], 1, workspace, "prediction_bytes")
        if prediction_bytes is not None:
            reference_bytes = _as_bytes(
                reference_array[start:stop], 255 if ignore_255 else 1, workspace, "reference_bytes"
            )
            if reference_bytes is not None:
                counted = _two_class_counts(prediction_bytes, reference_bytes, ignore_255, workspace)
        if counted is not None:
            totals = tuple(total + count for total, count in zip(totals, counted))
            continue
        block_counts = _count_histogram(
            prediction[start:stop], reference[start:stop], 2, ignore_index, workspace
        )
        counts = block_counts if counts is None else counts + block_counts
    labelled, reference_ones, predicted_ones, both_ones = totals
    fast_counts = torch.tensor(
        [
            [labelled - reference_ones - predicted_ones + both_ones, predicted_ones - both_ones, 0],
            [reference_ones - both_ones, both_ones, 0],
            [0, 0, 0],
        ],
        dtype=torch.int64,
    )
    return fast_counts if counts is None else counts + fast_counts


def _two_class_block_pixels(itemsize):
    return max(_TWO_CLASS_BLOCK_BYTES // itemsize // _SUM_BLOCK, 1) * _SUM_BLOCK


def _as_bytes(values, limit, workspace, name):
    """A 1-D uint8 or int64 array as uint8, or None when an int64 value lies outside [0, limit] (limit < 256).

    uint8 arrays are returned as they are. int64 ones are checked (their maximum as uint64, which also catches
    negative values) and narrowed into a workspace array.
    """
    if values.dtype == np.uint8:
        return values
    if values.view(np.uint64).max(initial=0) > limit:
        return None
    out = workspace.array(name, values.size)
    np.copyto(out, values, casting="unsafe")
    return out


def _two_class_counts(prediction, reference, ignore_255, workspace):
    """(labelled pixels, labelled pixels of class 1, labelled pixels predicted 1, pixels of class 1 predicted 1) of
    two 1-D uint8 maps, or None when a prediction is not 0 or 1, or a reference not 0, 1 or (if `ignore_255`) 255.

    These four numbers determine the 2 x 2 confusion matrix. Nothing here is a histogram: a few vectorised passes
    over uint8 arrays (maxima, counts of non-zero bytes, sums), each far cheaper than counting pixels into bins.
    """
    numel = reference.size
    if prediction.max(initial=0) > 1 or (not ignore_255 and reference.max(initial=0) > 1):
        return None
    # 0 where ignored (255 + 1 wraps around), 1 for class 0, 2 for class 1; anything else was out of range.
    classes = np.add(reference, 1, out=workspace.array("classes", numel))
    if ignore_255 and classes.max(initial=0) > 2:
        return None
    labelled = np.count_nonzero(classes)
    reference_ones = _sum_of_small(classes) - labelled
    # The class code where the prediction is 1, else 0.
    hits = np.multiply(classes, prediction, out=workspace.array("hits", numel))
    predicted_ones = np.count_nonzero(hits)
    both_ones = _sum_of_small(hits) - predicted_ones
    return labelled, reference_ones, predicted_ones, both_ones


def _sum_of_small(values):
    """Exact sum of a 1-D uint8 array whose values are at most 2.

    Summing `_SUM_ROWS` rows of uint64 words adds 8 byte lanes at once without carries between them; the lanes
    are then summed as bytes. That is one vectorised pass, where `values.sum()` widens every byte first.
    """
    whole = values.size - values.size % _SUM_BLOCK
    total = int(values[whole:].sum())
    if whole:
        lanes = values[:whole].view(np.uint64).reshape(_SUM_ROWS, -1).sum(axis=0)
        total += int(lanes.view(np.uint8).sum())
    return total


class _Workspace:
    """Scratch tensors reused from slice to slice and batch to batch.

    On CPUs, allocating fresh multi-megabyte temporaries for every slice can cost more than the counting itself
    (the allocator may hand the pages back to the system and fault them in again each time).
    """

    def __init__(self):
        self._tensors = {}
        self._arrays = {}

    def get(self, name, dtype, numel, device):
        tensor = self._tensors.get(name)
        if tensor is None or tensor.dtype != dtype or tensor.device != device or tensor.numel() < numel:
            tensor = self._tensors[name] = torch.empty(numel, dtype=dtype, device=device)
        return tensor[:numel]

    def array(self, name, numel):
        """A uint8 numpy array of `numel` elements, starting at the start of its buffer (so 8-byte aligned)."""
        array = self._arrays.get(name)
        if array is None or array.size < numel:
            array = self._arrays[name] = np.empty(numel, dtype=np.uint8)
        return array[:numel]


def _as_countable(values):
    """uint8 and int64 maps are counted as they are; other integer dtypes are widened to int64."""
    return values if values.dtype in (torch.uint8, torch.int64) else values.to(torch.int64)


def _pair_keys(prediction, reference, num_labels, ignore_index, workspace):
    """One key per pixel: (reference bin + 1) * (num_labels + 1) + prediction bin, or the prediction bin alone
    where the reference is `ignore_index`.

    A bin is the value itself in [0, num_labels) and num_labels for any other value. The keys are built in
    workspace tensors with integer arithmetic (no boolean indexing), in uint8 whenever the keys fit: on a CPU
    that is several times faster than int64.
    """
    num_keys = (num_labels + 2) * (num_labels + 1)
    key_dtype = torch.uint8 if num_keys <= 256 else torch.int64

    def scratch(name, dtype=key_dtype):
        return workspace.get(name, dtype, reference.numel(), reference.device)

    keys = _value_bins(reference, num_labels, scratch("keys"), scratch)
    keys.mul_(num_labels + 1).add_(num_labels + 1)
    if reference.dtype == torch.uint8 and not 0 <= ignore_index <= 255:
        pass  # matches no pixel (and comparing would wrap ignore_index around to a uint8 value)
    elif reference.dtype == torch.uint8 and key_dtype == torch.uint8:
        # (x ^ i) is 0 exactly where x == i; cheaper than a comparison.
        keys.mul_(torch.bitwise_xor(reference, ignore_index, out=scratch("labelled")).clamp_(max=1))
    else:
        keys.mul_(torch.ne(reference, ignore_index, out=scratch("labelled")))
    return keys.add_(_value_bins(prediction, num_labels, scratch("prediction_bins"), scratch))


def _value_bins(values, num_labels, out, scratch):
    """`out` filled with the values in [0, num_labels) kept and every other value replaced by num_labels."""
    if values.dtype == torch.uint8:
        if out.dtype == torch.uint8:
            return torch.clamp(values, max=num_labels, out=out)
        return out.copy_(values).clamp_(max=num_labels)
    wide = torch.clamp(values, -1, num_labels, out=scratch("wide", torch.int64))
    if out.dtype == torch.uint8:
        return out.copy_(wide).clamp_(max=num_labels)  # -1 wraps to 255
    return torch.remainder(wide, num_labels + 1, out=out)  # -1 becomes num_labels


def _bincount_keys(keys, num_keys):
    """`torch.bincount(keys, minlength=num_keys)`, reshaped for speed on CPUs when the keys are small.

    Counting one key per pixel into a few counters is latency bound: the large uniform regions of segmentation
    maps hit the same counter over and over. Instead, every two neighbouring uint8 keys are read as one int16
    and key slots are spread over `chains` interleaved sub-histograms, which are summed afterwards.
    """
    chains = min(16, 256 // num_keys)
    group = 2 * chains
    if keys.device.type != "cpu" or keys.dtype != torch.uint8 or num_keys > 128 or sys.byteorder != "little":
        return torch.bincount(keys, minlength=num_keys)
    whole = keys.numel() - keys.numel() % group
    head, tail = keys[:whole], keys[whole:]
    offsets = torch.zeros(group, dtype=torch.uint8)
    offsets[0::2] = torch.arange(chains, dtype=torch.uint8) * num_keys
    head.view(-1, group).add_(offsets)
    # int16 value = low byte (even position, offset key) + 256 * high byte (odd position, plain key).
    pairs = torch.bincount(head.view(torch.int16), minlength=256 * num_keys)[: 256 * num_keys]
    pairs = pairs.view(num_keys, 256)[:, : chains * num_keys].reshape(num_keys, chains, num_keys).sum(dim=1)
    return pairs.sum(dim=0) + pairs.sum(dim=1) + torch.bincount(tail, minlength=num_keys)


def _label_names(id2label, num_labels):
    if id2label is None:
        id2label = _TASK_ID2LABEL if num_labels == 2 else {i: f"class_{i}" for i in range(num_labels)}
    names = {int(index): str(name) for index, name in id2label.items()}
    if sorted(names) != list(range(num_labels)):
        raise ValueError(f"id2label must name the classes 0..{num_labels - 1}, got ids {sorted(names)}")
    if len(set(names.values())) != num_labels:
        raise ValueError(f"id2label names must be distinct, got {id2label!r}")
    for index, name in names.items():
        if f"{name}_iou" in _FIXED_KEYS:
            raise ValueError(f"id2label[{index}]={name!r} would overwrite the output {name + '_iou'!r}")
    return [names[i] for i in range(num_labels)]


def _metrics_from_counts(counts, names, nan_to_num):
    """The outputs of `mean_iou` from extended confusion counts (rows: reference, columns: prediction)."""
    num_labels = len(names)
    intersect = np.diag(counts)[:num_labels].astype(np.float64)
    area_label = counts[:num_labels, :].sum(axis=1).astype(np.float64)
    area_prediction = counts[:, :num_labels].sum(axis=0).astype(np.float64)
    area_union = area_prediction + area_label - intersect
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_category_iou = intersect / area_union
        per_category_accuracy = intersect / area_label
        metrics = {
            "mean_iou": np.nanmean(per_category_iou),
            "mean_accuracy": np.nanmean(per_category_accuracy),
            "overall_accuracy": intersect.sum() / area_label.sum(),
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
        }
    if nan_to_num is not None:
        metrics = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in metrics.items()}
    for index, name in enumerate(names):
        metrics[f"{name}_iou"] = metrics["per_category_iou"][index]
    metrics["pixel_accuracy"] = metrics["overall_accuracy"]
    metrics["confusion_matrix"] = counts[:num_labels, :num_labels].astype(np.int64)
    return metrics
