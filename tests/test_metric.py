"""The `sidewalk_iou` evaluate module and the loop-side accumulator: evaluate's `mean_iou` numbers, constant
memory, offline loading, and a two-process sum equal to one process."""

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sidewalk_hf.metrics import (
    SegmentationMetricAccumulator,
    SidewalkIoU,
    load_sidewalk_iou,
    sidewalk_iou_path,
)
from sidewalk_hf.metrics.sidewalk_iou import sidewalk_iou as sidewalk_iou_module

REPO = Path(__file__).resolve().parents[1]
MEAN_IOU_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")


def mean_iou_per_image_histograms(
    predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None, reduce_labels=False
):
    """evaluate's `mean_iou` (0.4.6) computation, image by image with `np.histogram`, as written there."""
    total_intersect = np.zeros((num_labels,), dtype=np.float64)
    total_union = np.zeros((num_labels,), dtype=np.float64)
    total_prediction = np.zeros((num_labels,), dtype=np.float64)
    total_label = np.zeros((num_labels,), dtype=np.float64)
    for prediction, label in zip(predictions, references):
        prediction = np.array(prediction)
        label = np.array(label)
        if label_map is not None:
            for old_id, new_id in label_map.items():
                label[label == old_id] = new_id
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = np.not_equal(label, ignore_index)
        prediction = prediction[mask]
        label = np.array(label)[mask]
        intersect = prediction[prediction == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_prediction = np.histogram(prediction, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_intersect += area_intersect
        total_union += area_prediction + area_label - area_intersect
        total_prediction += area_prediction
        total_label += area_label
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iou = total_intersect / total_union
        accuracy = total_intersect / total_label
        metrics = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": total_intersect.sum() / total_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        metrics = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in metrics.items()}
    return metrics


def assert_same_numbers(results, expected):
    for key in MEAN_IOU_KEYS:
        np.testing.assert_array_equal(results[key], expected[key], err_msg=key)


# Hand-computed: references in rows, predictions in columns.
#   reference 0: 3 pixels -> predicted 0, 0, 1      reference 1: 2 pixels -> predicted 1, 0
#   one ignored pixel (255), predicted 1.
HAND_PREDICTIONS = np.array([[0, 0, 1], [1, 0, 1]], dtype=np.uint8)
HAND_REFERENCES = np.array([[0, 0, 0], [1, 1, 255]], dtype=np.uint8)


def test_values_match_a_hand_computed_confusion_matrix():
    results = SidewalkIoU().compute(
        predictions=HAND_PREDICTIONS, references=HAND_REFERENCES, num_labels=2, ignore_index=255
    )
    np.testing.assert_array_equal(results["confusion_matrix"], [[2, 1], [1, 1]])
    # background: intersection 2, union 2 + 1 + 1 = 4; sidewalk: intersection 1, union 1 + 1 + 1 = 3
    assert results["background_iou"] == pytest.approx(2 / 4)
    assert results["sidewalk_iou"] == pytest.approx(1 / 3)
    assert results["mean_iou"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    np.testing.assert_allclose(results["per_category_accuracy"], [2 / 3, 1 / 2])
    assert results["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert results["pixel_accuracy"] == results["overall_accuracy"] == pytest.approx(3 / 5)


def test_ignored_pixels_count_nowhere_whatever_is_predicted_there():
    references = np.full((4, 4), 255, dtype=np.uint8)
    references[:2] = np.array([[0, 1, 1, 0], [0, 0, 1, 1]])
    base = np.zeros((4, 4), dtype=np.uint8)
    base[:2] = np.array([[0, 1, 0, 0], [1, 0, 1, 1]])
    other = base.copy()
    other[2:] = 1 - other[2:]
    first = SidewalkIoU(num_labels=2, ignore_index=255).compute(predictions=base, references=references)
    second = SidewalkIoU(num_labels=2, ignore_index=255).compute(predictions=other, references=references)
    assert_same_numbers(first, second)
    assert first["confusion_matrix"].sum() == 8


def test_a_class_absent_from_predictions_and_references_is_nan_and_left_out_of_the_means():
    predictions = np.array([[0, 0], [1, 0]])
    references = np.array([[0, 0], [0, 0]])
    results = SidewalkIoU().compute(
        predictions=predictions, references=references, num_labels=3, ignore_index=255
    )
    assert results["per_category_iou"][0] == pytest.approx(3 / 4)
    assert results["per_category_iou"][1] == 0.0  # predicted, never true
    assert math.isnan(results["per_category_iou"][2])
    assert results["mean_iou"] == pytest.approx((3 / 4 + 0.0) / 2)
    assert math.isnan(results["per_category_accuracy"][1]) and math.isnan(results["per_category_accuracy"][2])
    assert results["mean_accuracy"] == pytest.approx(3 / 4)


def test_nan_to_num_replaces_nan_after_the_means():
    predictions = np.array([[0, 0], [1, 0]])
    references = np.array([[0, 0], [0, 0]])
    results = SidewalkIoU().compute(
        predictions=predictions, references=references, num_labels=3, ignore_index=255, nan_to_num=-1
    )
    np.testing.assert_array_equal(results["per_category_iou"], [3 / 4, 0.0, -1.0])
    assert results["mean_iou"] == pytest.approx(3 / 8)


def test_out_of_range_reference_drops_its_label_but_keeps_its_prediction_as_mean_iou_does():
    results = SidewalkIoU().compute(
        predictions=np.array([[1, 1, 0, 0]]),
        references=np.array([[1, 7, 0, 255]]),
        num_labels=2,
        ignore_index=255,
    )
    np.testing.assert_array_equal(results["per_category_iou"], [1.0, 0.5])


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32, np.int16])
@pytest.mark.parametrize("num_labels", [1, 2, 5, 16])
def test_equals_per_image_numpy_histograms_on_random_maps(dtype, num_labels):
    rng = np.random.default_rng(num_labels)
    low = 0 if dtype == np.uint8 else -2  # negative and too-large values are neither counted nor ignored
    shapes = [(int(rng.integers(1, 90)), int(rng.integers(1, 90))) for _ in range(12)]
    predictions = [rng.integers(low, num_labels + 2, shape).astype(dtype) for shape in shapes]
    references = [rng.integers(low, num_labels + 2, shape).astype(dtype) for shape in shapes]
    for reference in references:
        reference[rng.random(reference.shape) < 0.15] = 255
    metric = SidewalkIoU(num_labels=num_labels, ignore_index=255)
    metric.add_batch(predictions=predictions[:5], references=references[:5])
    metric.add(prediction=torch.from_numpy(predictions[5]), reference=torch.from_numpy(references[5]))
    results = metric.compute(predictions=predictions[6:], references=references[6:])
    assert_same_numbers(results, mean_iou_per_image_histograms(predictions, references, num_labels, 255))


@pytest.mark.parametrize(
    "options",
    [
        {"nan_to_num": 0},
        {"label_map": {0: 2, 2: 1}},
        {"reduce_labels": True},
        {"label_map": {1: 3}, "reduce_labels": True, "nan_to_num": -1.0},
    ],
)
def test_equals_per_image_numpy_histograms_with_mean_iou_options(options):
    rng = np.random.default_rng(7)
    predictions = rng.integers(0, 4, (6, 40, 50)).astype(np.uint8)
    references = rng.integers(0, 4, (6, 40, 50)).astype(np.uint8)
    references[:, :5] = 255
    results = SidewalkIoU().compute(
        predictions=torch.from_numpy(predictions),
        references=torch.from_numpy(references),
        num_labels=3,
        ignore_index=255,
        **options,
    )
    expected = mean_iou_per_image_histograms(list(predictions), list(references.copy()), 3, 255, **options)
    assert_same_numbers(results, expected)


def test_large_batches_equal_per_image_numpy_histograms():
    """Maps large enough to exercise the sliced, paired counting used on CPUs, including odd pixel counts."""
    rng = np.random.default_rng(3)
    references = (rng.random((3, 517, 611)) < 0.1).astype(np.uint8)
    references[:, :40] = 255
    predictions = references.copy()
    predictions[references == 255] = 1
    flips = rng.random(predictions.shape) < 0.05
    predictions[flips] = 1 - predictions[flips]
    expected = mean_iou_per_image_histograms(predictions, references, 2, 255)
    for as_tensor in (torch.from_numpy, lambda array: torch.from_numpy(array).long()):
        results = SidewalkIoU(num_labels=2, ignore_index=255).compute(
            predictions=as_tensor(predictions), references=as_tensor(references)
        )
        assert_same_numbers(results, expected)


# Two classes on a CPU are counted without a histogram (`_two_class_counts`) whenever predictions are 0 or 1 and
# references 0, 1 or ignore_index; a block holding any other value goes to the general histogram
# (`_count_histogram`). Most tests shrink the blocks so that small maps span many: 3 * 1016 pixels when a map is
# int64, 8 times as many when both are uint8.
SMALL_BLOCK_BYTES = 8 * 3 * 1016


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(sidewalk_iou_module, "_TWO_CLASS_BLOCK_BYTES", SMALL_BLOCK_BYTES)


def block_pixels(*dtypes):
    return sidewalk_iou_module._two_class_block_pixels(max(np.dtype(dtype).itemsize for dtype in dtypes))


def two_class_maps(rng, num_pixels, ignore_index=255, ignored=0.2):
    references = (rng.random(num_pixels) < 0.3).astype(np.int64)
    references[rng.random(num_pixels) < ignored] = ignore_index
    predictions = (rng.random(num_pixels) < 0.4).astype(np.int64)
    return predictions, references


def both_ways(predictions, references, ignore_index=255):
    """The counts of the two-class path and of the general histogram, for the same flat maps."""
    workspace = sidewalk_iou_module._Workspace()
    prediction, reference = torch.from_numpy(predictions), torch.from_numpy(references)
    fast = sidewalk_iou_module._count_two_classes(prediction, reference, ignore_index, workspace)
    general = sidewalk_iou_module._count_histogram(prediction, reference, 2, ignore_index, workspace)
    return fast.numpy(), general.numpy()


def counted_without_histogram(predictions, references, ignore_index=255):
    """What the fast path makes of one block (int64 maps narrowed as `_count_two_classes` does); None: fall back."""
    workspace = sidewalk_iou_module._Workspace()
    ignore_255 = ignore_index == 255
    prediction_bytes = sidewalk_iou_module._as_bytes(predictions, 1, workspace, "prediction_bytes")
    reference_bytes = sidewalk_iou_module._as_bytes(
        references, 255 if ignore_255 else 1, workspace, "reference"
    )
    if prediction_bytes is None or reference_bytes is None:
        return None
    return sidewalk_iou_module._two_class_counts(prediction_bytes, reference_bytes, ignore_255, workspace)


DTYPE_PAIRS = [(np.uint8, np.uint8), (np.int64, np.int64), (np.uint8, np.int64), (np.int64, np.uint8)]


@pytest.mark.parametrize(("prediction_dtype", "reference_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("num_pixels", [0, 1, 999, 1016, 1017, "one block", "seven blocks and a bit"])
def test_two_class_counts_equal_the_general_histogram(
    small_blocks, prediction_dtype, reference_dtype, num_pixels
):
    block = block_pixels(prediction_dtype, reference_dtype)
    num_pixels = {"one block": block, "seven blocks and a bit": 7 * block + 1234}.get(num_pixels, num_pixels)
    rng = np.random.default_rng(num_pixels)
    predictions, references = two_class_maps(rng, num_pixels)
    predictions, references = predictions.astype(prediction_dtype), references.astype(reference_dtype)
    labelled = references != 255
    assert counted_without_histogram(predictions, references) == (
        int(labelled.sum()),
        int((references == 1).sum()),
        int(((predictions == 1) & labelled).sum()),
        int(((predictions == 1) & (references == 1)).sum()),
    )
    fast, general = both_ways(predictions, references)
    np.testing.assert_array_equal(fast, general)
    assert fast.sum() == labelled.sum()


@pytest.mark.parametrize(("prediction_dtype", "reference_dtype"), DTYPE_PAIRS)
def test_two_class_counts_equal_the_general_histogram_over_full_size_blocks(
    prediction_dtype, reference_dtype
):
    rng = np.random.default_rng(6)
    num_pixels = 2 * block_pixels(prediction_dtype, reference_dtype) + 54_321
    predictions, references = two_class_maps(rng, num_pixels)
    fast, general = both_ways(predictions.astype(prediction_dtype), references.astype(reference_dtype))
    np.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize(
    ("where", "value", "dtype"),
    [
        ("prediction", 2, np.uint8),
        ("prediction", 255, np.uint8),
        ("prediction", 2, np.int64),
        ("prediction", -1, np.int64),
        ("prediction", 256, np.int64),  # 0 once narrowed to a byte
        ("prediction", 257, np.int64),  # 1 once narrowed to a byte
        ("prediction", 1 + 2**40, np.int64),
        ("reference", 2, np.uint8),
        ("reference", 254, np.uint8),
        ("reference", 7, np.int64),
        ("reference", -1, np.int64),  # 255 once narrowed to a byte
        ("reference", 256, np.int64),
        ("reference", 257, np.int64),
        ("reference", 255 + 2**33, np.int64),
    ],
)
def test_a_value_outside_zero_one_and_ignore_index_falls_back_to_the_general_histogram(
    small_blocks, where, value, dtype
):
    rng = np.random.default_rng(5)
    block = block_pixels(dtype)
    num_pixels = 3 * block + 777
    predictions, references = (array.astype(dtype) for array in two_class_maps(rng, num_pixels))
    # One odd pixel in the second block, at a labelled pixel: that block alone falls back.
    index = block + 2021
    references[index] = 1
    (predictions if where == "prediction" else references)[index] = value
    for start in range(0, num_pixels, block):
        counted = counted_without_histogram(
            predictions[start : start + block], references[start : start + block]
        )
        assert (counted is None) == (start <= index < start + block)
    fast, general = both_ways(predictions, references)
    np.testing.assert_array_equal(fast, general)
    # The odd value lands in the "outside" bin of the extended matrix, as mean_iou counts it.
    assert fast[2].sum() + fast[:, 2].sum() == 1
    metric = SidewalkIoU(num_labels=2, ignore_index=255)
    metric.add_batch(
        predictions=torch.from_numpy(predictions)[None], references=torch.from_numpy(references)[None]
    )
    assert_same_numbers(metric.compute(), mean_iou_per_image_histograms([predictions], [references], 2, 255))


@pytest.mark.parametrize(
    ("ignore_index", "dtype"), [(-100, np.int64), (7, np.uint8), (7, np.int64), (300, np.uint8)]
)
def test_an_ignore_index_other_than_255_is_counted_fast_only_where_no_pixel_is_ignored(
    small_blocks, ignore_index, dtype
):
    rng = np.random.default_rng(11)
    block = block_pixels(dtype)
    predictions, references = two_class_maps(rng, 2 * block, ignore_index=0, ignored=0.0)
    if ignore_index != 300:  # uint8 maps cannot hold 300: nothing is ignored
        references[block:][rng.random(block) < 0.2] = ignore_index
    predictions, references = predictions.astype(dtype), references.astype(dtype)
    first, second = slice(0, block), slice(block, None)
    assert counted_without_histogram(predictions[first], references[first], ignore_index) is not None
    second_counted = counted_without_histogram(predictions[second], references[second], ignore_index)
    assert (second_counted is None) == (ignore_index != 300)
    fast, general = both_ways(predictions, references, ignore_index)
    np.testing.assert_array_equal(fast, general)
    # A 255 reference is an out-of-range label here, not an ignored pixel.
    references[3] = 255
    fast, general = both_ways(predictions, references, ignore_index)
    np.testing.assert_array_equal(fast, general)
    assert fast[2].sum() == 1


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32, torch.bool])
def test_two_class_maps_of_the_usual_dtypes_never_reach_the_histogram(monkeypatch, dtype):
    def no_histogram(*args, **kwargs):
        raise AssertionError("the general histogram was used")

    monkeypatch.setattr(sidewalk_iou_module, "_count_histogram", no_histogram)
    rng = np.random.default_rng(2)
    predictions = (rng.random((5, 300, 301)) < 0.4).astype(np.uint8)
    references = (rng.random((5, 300, 301)) < 0.3).astype(np.uint8)
    if dtype != torch.bool:
        references[:, :20] = 255
    expected = mean_iou_per_image_histograms(predictions, references, 2, 255)
    metric = SidewalkIoU(num_labels=2, ignore_index=255)
    metric.add_batch(
        predictions=torch.from_numpy(predictions[:2]).to(dtype),
        references=torch.from_numpy(references[:2]).to(dtype),
    )
    metric.add(prediction=torch.from_numpy(predictions[2]).to(dtype), reference=references[2])  # numpy uint8
    results = metric.compute(
        predictions=[torch.from_numpy(p).to(dtype) for p in predictions[3:]], references=list(references[3:])
    )
    assert_same_numbers(results, expected)


@pytest.mark.parametrize("options", [{"reduce_labels": True}, {"label_map": {2: 1, 3: 255}}])
def test_two_classes_with_label_map_or_reduce_labels_equal_per_image_numpy_histograms(options):
    rng = np.random.default_rng(8)
    predictions = (rng.random((4, 60, 70)) < 0.4).astype(np.uint8)
    references = rng.integers(0, 4, (4, 60, 70)).astype(np.uint8)
    references[:, :6] = 255
    results = SidewalkIoU().compute(
        predictions=torch.from_numpy(predictions),
        references=torch.from_numpy(references),
        num_labels=2,
        ignore_index=255,
        **options,
    )
    expected = mean_iou_per_image_histograms(list(predictions), list(references.copy()), 2, 255, **options)
    assert_same_numbers(results, expected)


def test_strided_maps_are_counted_like_contiguous_ones():
    rng = np.random.default_rng(4)
    predictions, references = (torch.from_numpy(array) for array in two_class_maps(rng, 2 * 50_000))
    strided_predictions, strided_references = predictions[::2], references[::2]  # flat views with stride 2
    assert not strided_predictions.is_contiguous()
    results = SidewalkIoU(num_labels=2, ignore_index=255).compute(
        predictions=strided_predictions[None], references=strided_references[None]
    )
    expected = SidewalkIoU(num_labels=2, ignore_index=255).compute(
        predictions=strided_predictions.contiguous()[None], references=strided_references.contiguous()[None]
    )
    assert_same_numbers(results, expected)
    np.testing.assert_array_equal(results["confusion_matrix"], expected["confusion_matrix"])


@pytest.mark.parametrize("size", [0, 1, 1015, 1016, 1017, 5 * 1016 + 3, 300_000])
def test_sum_of_small_values_is_exact(size):
    random_values = np.random.default_rng(size).integers(0, 3, size).astype(np.uint8)
    all_twos = np.full(size, 2, dtype=np.uint8)  # every byte lane sums to its largest possible value
    for values in (random_values, all_twos):
        assert sidewalk_iou_module._sum_of_small(values) == int(values.sum(dtype=np.int64))


def test_memory_is_a_small_confusion_matrix_however_many_maps_are_added():
    metric = SidewalkIoU(num_labels=2, ignore_index=255)
    maps = torch.randint(0, 2, (8, 64, 64), dtype=torch.uint8)
    for _ in range(50):
        metric.add_batch(predictions=maps, references=maps)
    assert len(metric) == 400
    assert metric._counts.shape == (3, 3)  # the whole state: in-range classes plus one "outside" bin
    assert metric.compute()["mean_iou"] == 1.0


def test_compute_resets_the_counts():
    metric = SidewalkIoU(num_labels=2, ignore_index=255)
    metric.add_batch(predictions=HAND_PREDICTIONS, references=HAND_REFERENCES)
    metric.compute()
    assert len(metric) == 0
    results = metric.compute()
    assert math.isnan(results["mean_iou"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.add_batch(predictions=HAND_PREDICTIONS, references=HAND_REFERENCES), "ignore_index"),
        (
            lambda m: m.compute(
                predictions=HAND_PREDICTIONS.astype(np.float32), references=HAND_REFERENCES, ignore_index=255
            ),
            "argmax",
        ),
        (
            lambda m: m.compute(
                predictions=[HAND_PREDICTIONS, HAND_PREDICTIONS],
                references=[HAND_REFERENCES, HAND_REFERENCES[:, :2]],
                ignore_index=255,
            ),
            r"predictions\[1\] has shape \(2, 3\) but references\[1\] has shape \(2, 2\)",
        ),
        (
            lambda m: m.compute(
                predictions=np.stack([HAND_PREDICTIONS] * 2), references=HAND_REFERENCES, ignore_index=255
            ),
            "Mismatch in the number of predictions",
        ),
        (
            lambda m: m.compute(
                predictions=HAND_PREDICTIONS, references=HAND_REFERENCES, num_labels=3, ignore_index=255
            ),
            "num_labels=3 in this call contradicts num_labels=2",
        ),
        (lambda m: m.compute(num_label=2), "unknown argument"),
    ],
)
def test_bad_inputs_fail_with_a_message_naming_them(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(SidewalkIoU(num_labels=2))


def test_class_names_come_from_id2label():
    results = SidewalkIoU(num_labels=2, ignore_index=255, id2label={0: "ground", 1: "path"}).compute(
        predictions=HAND_PREDICTIONS, references=HAND_REFERENCES
    )
    assert results["ground_iou"] == pytest.approx(0.5) and results["path_iou"] == pytest.approx(1 / 3)
    assert "sidewalk_iou" not in results


def test_evaluate_load_works_offline_from_the_shipped_path(tmp_path):
    """A fresh process, an empty HF_HOME and HF_EVALUATE_OFFLINE=1: nothing can come from the Hub or a cache."""
    module_dir = str(Path(sidewalk_iou_path()).parent)
    code = (
        "import evaluate, json, numpy as np\n"
        f"metric = evaluate.load({module_dir!r}, num_labels=2, ignore_index=255)\n"
        "assert isinstance(metric, evaluate.Metric), type(metric)\n"
        "r = metric.compute(predictions=[np.array([[1, 1], [0, 0]])], references=[np.array([[1, 0], [0, 255]])])\n"
        "print(json.dumps({k: float(r[k]) for k in ('mean_iou', 'sidewalk_iou', 'background_iou')}))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "mean_iou": 0.5,
        "sidewalk_iou": 0.5,
        "background_iou": 0.5,
    }


def test_load_sidewalk_iou_gives_the_same_numbers_as_the_class():
    loaded = load_sidewalk_iou(num_labels=2, ignore_index=255)
    assert type(loaded).__name__ == "SidewalkIoU"
    assert_same_numbers(
        loaded.compute(predictions=HAND_PREDICTIONS, references=HAND_REFERENCES),
        SidewalkIoU(num_labels=2, ignore_index=255).compute(
            predictions=HAND_PREDICTIONS, references=HAND_REFERENCES
        ),
    )


def test_accumulator_takes_logits_and_returns_plain_python_values():
    logits = torch.zeros((2, 2, 2, 3))
    logits[:, 1] = torch.from_numpy(HAND_PREDICTIONS).float()  # sidewalk wins where the prediction is 1
    accumulator = SegmentationMetricAccumulator(num_labels=2, ignore_index=255)
    accumulator.update(logits[:1], torch.from_numpy(HAND_REFERENCES)[None].long())
    results = accumulator.compute()
    assert results["sidewalk_iou"] == pytest.approx(1 / 3)
    assert results["confusion_matrix"] == [[2, 1], [1, 1]]
    assert isinstance(results["mean_iou"], float) and isinstance(results["per_category_iou"], list)
    json.dumps(results)


def test_accumulator_rejects_logits_with_the_wrong_number_of_classes():
    with pytest.raises(ValueError, match=r"logits of shape \(batch, 2, height, width\)"):
        SegmentationMetricAccumulator(num_labels=2).update(torch.zeros((1, 3, 4, 4)), torch.zeros((1, 4, 4)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_sum_to_the_one_process_result(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand((10, 24, 20), generator=generator) < 0.3).long()
    labels[:, :3] = 255
    logits = torch.randn((10, 2, 24, 20), generator=generator)
    torch.save({"logits": logits, "labels": labels}, tmp_path / "data.pt")

    single = SegmentationMetricAccumulator(num_labels=2, ignore_index=255)
    for start in range(0, 10, 4):
        single.update(logits[start : start + 4], labels[start : start + 4])
    expected = single.compute()

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(REPO / "tests" / "metric_two_process_worker.py"),
        str(tmp_path / "data.pt"),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2 and record["distributed_type"] == "MULTI_CPU", record
        assert record["results"] == expected, f"rank {rank}"
