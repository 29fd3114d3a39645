"""Detectron2 checkpoint conversion, on a DeepLabV3+ R-103 checkpoint fabricated from the real key list.

`data/d2_state_dict_keys.txt` lists the 688 state-dict entries of Detectron2's 19-class DeepLabV3+ R-103 with
their shapes, and `data/d2_to_timm_backbone_mapping.tsv` the verified Detectron2 -> timm `resnet101s` backbone
names. The fabricated checkpoint is a model-zoo style pickle of numpy arrays with random values.
"""

import ast
import contextlib
import importlib.util
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from sidewalk_hf import SidewalkDeepLabConfig, SidewalkDeepLabForSemanticSegmentation
from sidewalk_hf.convert_detectron2 import (
    UnsafePickleError,
    convert_detectron2_checkpoint,
    load_detectron2_state_dict,
    load_detectron2_weights,
    read_detectron2_checkpoint,
)

DATA = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).parent.parent
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
PREDICTOR_KEYS = {"sem_seg_head.predictor.weight", "sem_seg_head.predictor.bias"}

# Detectron2 DeepLabV3+ decoder modules (conv + norm) and the sidewalk modules they load into.
HEAD_CONV_NORM_MODULES = {
    "sem_seg_head.decoder.res5.project_conv.convs.0": "decode_head.aspp.branches.0",
    "sem_seg_head.decoder.res5.project_conv.convs.1": "decode_head.aspp.branches.1",
    "sem_seg_head.decoder.res5.project_conv.convs.2": "decode_head.aspp.branches.2",
    "sem_seg_head.decoder.res5.project_conv.convs.3": "decode_head.aspp.branches.3",
    "sem_seg_head.decoder.res5.project_conv.project": "decode_head.aspp.project",
    "sem_seg_head.decoder.res2.project_conv": "decode_head.low_level_projection",
    "sem_seg_head.decoder.res2.fuse_conv.0": "decode_head.fuse.0",
    "sem_seg_head.decoder.res2.fuse_conv.1": "decode_head.fuse.1",
}
HEAD_BIASED_CONVS = {
    "sem_seg_head.decoder.res5.project_conv.convs.4.1": "decode_head.aspp.image_pooling_conv",
    "sem_seg_head.predictor": "decode_head.classifier",
}


def command_line_main():
    """`main` of scripts/convert_detectron2_checkpoint.py (scripts/ is not a package)."""
    path = REPO_ROOT / "scripts" / "convert_detectron2_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_detectron2_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def detectron2_key_list() -> list[tuple[str, tuple[int, ...], str]]:
    rows = [line.split("\t") for line in (DATA / "d2_state_dict_keys.txt").read_text().splitlines()]
    return [(name, ast.literal_eval(shape), dtype) for name, shape, dtype in rows]


def expected_name_mapping() -> dict[str, str]:
    """Detectron2 key -> our key, from the backbone table and the decoder table above."""
    rows = [
        line.split("\t") for line in (DATA / "d2_to_timm_backbone_mapping.tsv").read_text().splitlines()[1:]
    ]
    mapping = {d2_name: f"backbone.{timm_name}" for d2_name, timm_name, _ in rows}
    for d2_module, our_module in HEAD_CONV_NORM_MODULES.items():
        mapping[f"{d2_module}.weight"] = f"{our_module}.conv.weight"
        for buffer in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            mapping[f"{d2_module}.norm.{buffer}"] = f"{our_module}.norm.{buffer}"
    for d2_module, our_module in HEAD_BIASED_CONVS.items():
        mapping[f"{d2_module}.weight"] = f"{our_module}.weight"
        mapping[f"{d2_module}.bias"] = f"{our_module}.bias"
    return mapping


def fabricate_detectron2_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random values at the true shapes, scaled so that activations stay moderate through the 33 blocks."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for name, shape, dtype in detectron2_key_list():
        if dtype == "torch.int64":
            value = np.array(rng.integers(1, 90_000), dtype=np.int64)
        elif name.endswith("norm.weight"):
            value = rng.uniform(0.5, 1.0, shape)
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 4:
            value = rng.normal(0.0, (1.0 / np.prod(shape[1:])) ** 0.5, shape)
        else:  # BatchNorm bias and running mean, conv biases
            value = rng.normal(0.0, 0.1, shape)
        state_dict[name] = value.astype(np.int64 if dtype == "torch.int64" else np.float32)
    state_dict["pixel_mean"] = np.array(PIXEL_MEAN, dtype=np.float32).reshape(3, 1, 1)
    state_dict["pixel_std"] = np.array(PIXEL_STD, dtype=np.float32).reshape(3, 1, 1)
    return state_dict


@pytest.fixture(scope="module")
def d2_state_dict():
    return fabricate_detectron2_state_dict()


@pytest.fixture(scope="module")
def d2_checkpoint(d2_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("detectron2") / "model_final.pkl"
    with open(path, "wb") as file:
        pickle.dump({"model": d2_state_dict, "__author__": "Detectron2 Model Zoo"}, file)
    return path


@pytest.fixture(scope="module")
def converted_19_classes(d2_checkpoint, tmp_path_factory):
    """The command-line conversion the Cityscapes checkpoint gets: 19 classes, predictor kept."""
    output_dir = tmp_path_factory.mktemp("converted_19")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = command_line_main()([str(d2_checkpoint), str(output_dir), "--num-labels", "19"])
    assert exit_code == 0
    return output_dir, printed.getvalue()


@pytest.fixture(scope="module")
def r101_two_classes():
    return SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig())


def test_command_line_conversion_reports_what_it_loaded(converted_19_classes):
    output_dir, printed = converted_19_classes
    assert "Loaded 688 tensors" in printed
    assert "Left out 2 checkpoint tensors" in printed and "pixel_mean" in printed and "pixel_std" in printed
    assert "Left 0 model tensors at their initialisation" in printed
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_sidewalk_deeplab.py",
    } <= set(os.listdir(output_dir))


def test_every_checkpoint_tensor_lands_where_the_mapping_says(converted_19_classes, d2_state_dict):
    output_dir, _ = converted_19_classes
    saved = load_file(output_dir / "model.safetensors")
    mapping = expected_name_mapping()
    assert set(mapping) == {name for name, _, _ in detectron2_key_list()}  # the tables cover all 688 keys
    assert sorted(mapping.values()) == sorted(saved)  # one-to-one onto our state dict
    for d2_name, our_name in mapping.items():
        np.testing.assert_array_equal(saved[our_name].numpy(), d2_state_dict[d2_name], err_msg=d2_name)


def test_converted_folder_loads_strictly_with_labels_and_normalisation(converted_19_classes):
    output_dir, _ = converted_19_classes
    model, loading_info = AutoModelForSemanticSegmentation.from_pretrained(
        output_dir, output_loading_info=True
    )
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    assert not loading_info["mismatched_keys"]
    assert model.config.num_labels == 19
    assert model.config.id2label[0] == "road" and model.config.id2label[1] == "sidewalk"
    assert model.config.image_mean == PIXEL_MEAN and model.config.image_std == PIXEL_STD
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert processor.image_mean == pytest.approx([value / 255 for value in PIXEL_MEAN])
    assert processor.image_std == pytest.approx([value / 255 for value in PIXEL_STD])


def detectron2_deeplabv3plus_logits(weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Detectron2's DeepLabV3+ R-103 forward, written from its architecture on its own state-dict names.

    Inference semantics: BatchNorm with running statistics, no dropout, normalised input. The ASPP pooling
    window covers the whole res5 map, which is what Detectron2's fixed kernel does at its training crop size.
    """

    def conv_norm(x, prefix, stride=1, dilation=1, relu=True):
        kernel = weights[f"{prefix}.weight"]
        padding = dilation * (kernel.shape[-1] - 1) // 2
        x = F.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation)
        x = F.batch_norm(
            x,
            weights[f"{prefix}.norm.running_mean"],
            weights[f"{prefix}.norm.running_var"],
            weights[f"{prefix}.norm.weight"],
            weights[f"{prefix}.norm.bias"],
            training=False,
            eps=1e-5,
        )
        return F.relu(x) if relu else x

    x = conv_norm(images, "backbone.stem.conv1", stride=2)
    x = conv_norm(x, "backbone.stem.conv2")
    x = conv_norm(x, "backbone.stem.conv3")
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    features = {}
    for stage, first_stride, dilations in (
        ("res2", 1, [1] * 3),
        ("res3", 2, [1] * 4),
        ("res4", 2, [1] * 23),
        ("res5", 1, [2, 4, 8]),
    ):
        for block, dilation in enumerate(dilations):
            prefix = f"backbone.{stage}.{block}"
            stride = first_stride if block == 0 else 1
            shortcut = conv_norm(x, f"{prefix}.shortcut", stride=stride, relu=False) if block == 0 else x
            y = conv_norm(x, f"{prefix}.conv1")
            y = conv_norm(y, f"{prefix}.conv2", stride=stride, dilation=dilation)
            y = conv_norm(y, f"{prefix}.conv3", relu=False)
            x = F.relu(y + shortcut)
        features[stage] = x

    aspp = "sem_seg_head.decoder.res5.project_conv"
    res5 = features["res5"]
    branches = [conv_norm(res5, f"{aspp}.convs.0")]
    branches += [
        conv_norm(res5, f"{aspp}.convs.{i}", dilation=rate) for i, rate in enumerate((6, 12, 18), start=1)
    ]
    pooled = F.avg_pool2d(res5, kernel_size=res5.shape[-2:], stride=1)
    pooled = F.relu(F.conv2d(pooled, weights[f"{aspp}.convs.4.1.weight"], weights[f"{aspp}.convs.4.1.bias"]))
    branches.append(F.interpolate(pooled, size=res5.shape[-2:], mode="bilinear", align_corners=False))
    context = conv_norm(torch.cat(branches, dim=1), f"{aspp}.project")

    low_level = conv_norm(features["res2"], "sem_seg_head.decoder.res2.project_conv")
    context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
    y = torch.cat([low_level, context], dim=1)
    y = conv_norm(y, "sem_seg_head.decoder.res2.fuse_conv.0")
    y = conv_norm(y, "sem_seg_head.decoder.res2.fuse_conv.1")
    y = F.conv2d(y, weights["sem_seg_head.predictor.weight"], weights["sem_seg_head.predictor.bias"])
    return F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)


def test_converted_model_reproduces_detectron2_logits(converted_19_classes, d2_state_dict):
    output_dir, _ = converted_19_classes
    model = SidewalkDeepLabForSemanticSegmentation.from_pretrained(output_dir).double().eval()
    weights = {name: torch.from_numpy(array).double() for name, array in d2_state_dict.items()}
    images = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.inference_mode():
        expected = detectron2_deeplabv3plus_logits(weights, images)
        logits = model(images).logits
    assert logits.shape == expected.shape == (1, 19, 64, 128)
    assert expected.std() > 0.01  # not a degenerate comparison
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_two_class_conversion_drops_only_the_predictor(d2_checkpoint, d2_state_dict, tmp_path):
    report = convert_detectron2_checkpoint(d2_checkpoint, tmp_path, num_labels=2)
    assert set(report.left_out) == {"pixel_mean", "pixel_std"} | PREDICTOR_KEYS
    assert set(report.left_at_init) == {"decode_head.classifier.weight", "decode_head.classifier.bias"}
    assert len(report.loaded) == 688 - 2
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["decode_head.classifier.weight"].shape == (2, 256, 1, 1)
    np.testing.assert_array_equal(
        saved["decode_head.fuse.1.conv.weight"].numpy(),
        d2_state_dict["sem_seg_head.decoder.res2.fuse_conv.1.weight"],
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "background", "1": "sidewalk"}
    assert config["class_weights"] == [1.0, 10.0]


def test_weights_path_loading_reports_the_checkpoint_normalisation(d2_checkpoint, r101_two_classes):
    report = load_detectron2_weights(r101_two_classes, d2_checkpoint)
    assert report.pixel_mean == pytest.approx(PIXEL_MEAN) and report.pixel_std == pytest.approx(PIXEL_STD)
    assert "decode_head.classifier.weight" in report.left_at_init
    assert str(report).startswith(f"Loaded 686 tensors from {d2_checkpoint}")


def test_missing_num_batches_tracked_counters_are_tolerated(d2_state_dict, r101_two_classes):
    without_counters = {k: v for k, v in d2_state_dict.items() if not k.endswith("num_batches_tracked")}
    report = load_detectron2_state_dict(r101_two_classes, without_counters)
    assert len(report.loaded) == 688 - 114 - 2
    assert sum(key.endswith("num_batches_tracked") for key in report.left_at_init) == 114


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda sd: sd.pop("backbone.res4.7.conv2.weight"),
            r"(?s)1 model tensors missing.*layer3\.7\.conv2\.weight",
        ),
        (
            lambda sd: sd.update({"backbone.res6.0.conv1.weight": np.zeros(1)}),
            r"1 checkpoint tensors with no place",
        ),
        (
            lambda sd: sd.update({"backbone.stem.conv1.weight": np.zeros((64, 4, 3, 3), np.float32)}),
            r"1 shape mismatches:\n  backbone.stem.conv1.weight \(64, 4, 3, 3\) -> backbone.conv1.0.weight",
        ),
    ],
)
def test_checkpoints_that_do_not_fit_are_refused_and_the_model_kept(
    d2_state_dict, r101_two_classes, change, message
):
    state_dict = dict(d2_state_dict)
    change(state_dict)
    before = r101_two_classes.backbone.conv1[0].weight.clone()
    with pytest.raises(ValueError, match=message):
        load_detectron2_state_dict(r101_two_classes, state_dict)
    assert torch.equal(r101_two_classes.backbone.conv1[0].weight, before)


def test_r103_checkpoint_into_a_tiny_backbone_is_refused(d2_checkpoint):
    tiny = SidewalkDeepLabForSemanticSegmentation(
        SidewalkDeepLabConfig(
            backbone="test_resnet", res5_multi_grid=[1], aspp_channels=16, decoder_channels=16
        )
    )
    with pytest.raises(ValueError, match=r"does not fit this model \(backbone 'test_resnet'"):
        load_detectron2_weights(tiny, d2_checkpoint)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path, r101_two_classes):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_detectron2_weights(r101_two_classes, tmp_path / "absent.pkl")


class _RunsShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvaluatesCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize(
    ("payload", "refused_global"), [(_RunsShellCommand, "system"), (_EvaluatesCode, "builtins.eval")]
)
def test_pickle_that_calls_code_is_refused_before_anything_runs(tmp_path, payload, refused_global):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pkl"
    arrays = {"backbone.stem.conv1.weight": np.zeros((64, 3, 3, 3), np.float32)}
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": payload(marker)}))
    with pytest.raises(UnsafePickleError, match=rf"references the global '[\w.]*{refused_global}'"):
        read_detectron2_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("protocol", "numpy_1_names"),
    [(protocol, False) for protocol in range(pickle.HIGHEST_PROTOCOL + 1)]
    # numpy 1 wrote numpy.core.* globals; in protocols 0-2 they are plain text and can be rewritten here.
    + [(protocol, True) for protocol in range(3)],
)
def test_pickles_of_every_protocol_and_numpy_generation_are_read(tmp_path, protocol, numpy_1_names):
    arrays = {"module.a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(7, dtype=np.int64)}
    data = pickle.dumps(
        {"model": arrays, "__author__": "Detectron2 Model Zoo", "iteration": np.int64(3)}, protocol
    )
    if numpy_1_names:
        data = data.replace(b"numpy._core.", b"numpy.core.")
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(data)
    state_dict = read_detectron2_checkpoint(path)
    assert set(state_dict) == {"a", "b"}  # "module." stripped
    np.testing.assert_array_equal(state_dict["a"], arrays["module.a"])
    assert state_dict["b"] == 7


def test_command_line_refuses_a_malicious_pickle(tmp_path, capsys):
    path = tmp_path / "malicious.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "x": _RunsShellCommand(tmp_path / "code_ran")}))
    assert command_line_main()([str(path), str(tmp_path / "out")]) == 1
    assert "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "code_ran").exists()
