"""SidewalkDeepLabConfig: the documented defaults, JSON round trip, and clear errors for invalid values."""

import json

import pytest

from sidewalk_hf import SidewalkDeepLabConfig


def test_defaults_are_the_reference_recipe():
    config = SidewalkDeepLabConfig()
    assert config.model_type == "sidewalk-deeplab"
    assert config.backbone == "resnet101s"
    assert config.num_channels == 3
    assert config.output_stride == 16
    assert config.res5_multi_grid == [1, 2, 4]
    assert config.aspp_dilations == [6, 12, 18]
    assert config.aspp_channels == 256
    assert config.aspp_dropout == 0.1
    assert config.project_channels == 48
    assert config.decoder_channels == 256
    assert config.num_labels == 2
    assert config.id2label == {0: "background", 1: "sidewalk"}
    assert config.label2id == {"background": 0, "sidewalk": 1}
    assert config.ignore_index == 255
    assert config.class_weights == [1.0, 10.0]
    assert config.top_k_percent_pixels == 1.0
    assert config.image_mean == [123.675, 116.28, 103.53]
    assert config.image_std == [58.395, 57.12, 57.375]


def test_save_and_load_keep_every_field(tmp_path):
    config = SidewalkDeepLabConfig(
        backbone="resnet18",
        num_channels=4,
        output_stride=8,
        res5_multi_grid=[1, 2],
        image_mean=[1.0, 2.0, 3.0, 4.0],
        image_std=[5.0, 6.0, 7.0, 8.0],
        id2label={0: "background", 1: "sidewalk", 2: "crossing"},
        class_weights=[1.0, 10.0, 5.0],
        top_k_percent_pixels=0.2,
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "sidewalk-deeplab"
    loaded = SidewalkDeepLabConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.id2label == {0: "background", 1: "sidewalk", 2: "crossing"}
    assert loaded.num_labels == 3


def test_num_labels_alone_gives_generic_names_and_needs_matching_weights():
    config = SidewalkDeepLabConfig(num_labels=19, class_weights=None)
    assert config.num_labels == 19
    assert config.class_weights is None
    with pytest.raises(ValueError, match=r"class_weights must have one weight per label \(19 labels\)"):
        SidewalkDeepLabConfig(num_labels=19)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "resnet101x"}, r"backbone='resnet101x' is not a timm model name.*'resnet101s'"),
        ({"output_stride": 12}, r"output_stride must be one of \(8, 16, 32\), got 12"),
        ({"class_weights": [1.0]}, r"class_weights must have one weight per label \(2 labels\)"),
        ({"class_weights": [1.0, -1.0]}, r"class_weights must be finite non-negative numbers"),
        ({"top_k_percent_pixels": 0.0}, r"top_k_percent_pixels must be a fraction in \(0, 1\]"),
        ({"top_k_percent_pixels": 1.5}, r"top_k_percent_pixels must be a fraction in \(0, 1\]"),
        ({"image_mean": [1.0, 2.0]}, r"image_mean must have one value per input band \(num_channels=3\)"),
        ({"num_channels": 4}, r"image_mean must have one value per input band \(num_channels=4\)"),
        ({"image_std": [1.0, 0.0, 1.0]}, r"image_std must hold positive numbers"),
        ({"res5_multi_grid": []}, r"res5_multi_grid must be a non-empty list of positive integers"),
        ({"aspp_dilations": [6, 0]}, r"aspp_dilations must be a non-empty list of positive integers"),
        ({"aspp_channels": 0}, r"aspp_channels must be a positive integer"),
        ({"aspp_dropout": 1.0}, r"aspp_dropout must be a probability in \[0, 1\)"),
        (
            {"ignore_index": 1},
            r"ignore_index must be an integer outside the class ids 0..1, such as 255; got 1",
        ),
        ({"ignore_index": "255"}, r"ignore_index must be an integer outside the class ids"),
    ],
)
def test_invalid_values_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        SidewalkDeepLabConfig(**overrides)
