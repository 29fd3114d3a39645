"""Configuration of the sidewalk DeepLabV3+ model.

Written in the classic ``__init__(..., **kwargs)`` style so that this file, copied to the Hub as remote code,
also loads under transformers 4.x.
"""

import difflib
import math

import timm
from transformers import PretrainedConfig

DEFAULT_ID2LABEL = {0: "background", 1: "sidewalk"}

# Detectron2's DeepLab inputs: RGB on the 0-255 scale, ImageNet statistics.
DETECTRON2_IMAGENET_MEAN = (123.675, 116.28, 103.53)
DETECTRON2_IMAGENET_STD = (58.395, 57.12, 57.375)

VALID_OUTPUT_STRIDES = (8, 16, 32)


class SidewalkDeepLabConfig(PretrainedConfig):
    r"""
    Hyper-parameters of [`SidewalkDeepLabForSemanticSegmentation`]: a timm encoder with Detectron2's
    DeepLabV3+ decoder, and the class-weighted hard pixel mining loss it trains with. Invalid values raise a
    `ValueError` here, at construction, rather than deep inside the model.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet101s"`):
            Name of a timm model that supports `features_only` and `output_stride`. The default is the
            ResNet-101 with the deep 3-conv stem that Detectron2 calls R-103.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input bands.
        output_stride (`int`, *optional*, defaults to 16):
            Stride of the deepest feature map (8, 16 or 32); the stages below it are dilated instead of
            strided.
        res5_multi_grid (`list[int]`, *optional*, defaults to `[1, 2, 4]`):
            Dilation multipliers of the blocks of the last stage (ResNet-style backbones): block `j` is
            dilated `(32 / output_stride) * res5_multi_grid[j]`, i.e. 2, 4, 8 at output stride 16. One entry
            per block.
        aspp_dilations (`list[int]`, *optional*, defaults to `[6, 12, 18]`):
            Rates of the 3x3 atrous branches of ASPP.
        aspp_channels (`int`, *optional*, defaults to 256):
            Channels of every ASPP branch and of its projection.
        aspp_dropout (`float`, *optional*, defaults to 0.1):
            Dropout after the ASPP projection (training only).
        project_channels (`int`, *optional*, defaults to 48):
            Channels the stride-4 feature is projected to before it is fused with the ASPP output.
        decoder_channels (`int`, *optional*, defaults to 256):
            Channels of the two 3x3 fusion convolutions.
        id2label (`dict[int, str]`, *optional*, defaults to `{0: "background", 1: "sidewalk"}`):
            Class names; `num_labels` follows from it.
        ignore_index (`int`, *optional*, defaults to 255):
            Mask value that marks pixels without a label; they add nothing to the loss.
        class_weights (`list[float]` or `None`, *optional*, defaults to `[1.0, 10.0]`):
            Per-class loss weights, one per label; `None` weighs all classes equally.
        top_k_percent_pixels (`float`, *optional*, defaults to 1.0):
            Fraction of the hardest pixels whose losses are averaged; 1.0 is plain (weighted) cross-entropy.
        image_mean (`list[float]`, *optional*, defaults to Detectron2's ImageNet RGB mean):
            Per-band mean on the 0-255 scale, read by the image processor.
        image_std (`list[float]`, *optional*, defaults to Detectron2's ImageNet RGB standard deviation):
            Per-band standard deviation on the 0-255 scale, read by the image processor.
    """

    model_type = "sidewalk-deeplab"

    def __init__(
        self,
        backbone="resnet101s",
        num_channels=3,
        output_stride=16,
        res5_multi_grid=(1, 2, 4),
        aspp_dilations=(6, 12, 18),
        aspp_channels=256,
        aspp_dropout=0.1,
        project_channels=48,
        decoder_channels=256,
        ignore_index=255,
        class_weights=(1.0, 10.0),
        top_k_percent_pixels=1.0,
        image_mean=DETECTRON2_IMAGENET_MEAN,
        image_std=DETECTRON2_IMAGENET_STD,
        id2label=None,
        label2id=None,
        **kwargs,
    ):
        if id2label is None and kwargs.get("num_labels") is None:
            id2label = dict(DEFAULT_ID2LABEL)
        if id2label is not None and label2id is None:
            label2id = {name: int(index) for index, name in id2label.items()}

        self.backbone = _timm_model_name(backbone)
        self.num_channels = _positive_int("num_channels", num_channels)
        if output_stride not in VALID_OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride!r}")
        self.output_stride = int(output_stride)
        self.res5_multi_grid = _positive_int_list("res5_multi_grid", res5_multi_grid)
        self.aspp_dilations = _positive_int_list("aspp_dilations", aspp_dilations)
        self.aspp_channels = _positive_int("aspp_channels", aspp_channels)
        if not (isinstance(aspp_dropout, (int, float)) and 0.0 <= aspp_dropout < 1.0):
            raise ValueError(f"aspp_dropout must be a probability in [0, 1), got {aspp_dropout!r}")
        self.aspp_dropout = float(aspp_dropout)
        self.project_channels = _positive_int("project_channels", project_channels)
        self.decoder_channels = _positive_int("decoder_channels", decoder_channels)
        self.ignore_index = ignore_index
        if not (isinstance(top_k_percent_pixels, (int, float)) and 0.0 < top_k_percent_pixels <= 1.0):
            raise ValueError(
                "top_k_percent_pixels must be a fraction in (0, 1] (1.0 keeps every pixel), "
                f"got {top_k_percent_pixels!r}"
            )
        self.top_k_percent_pixels = float(top_k_percent_pixels)
        self.image_mean = _band_values("image_mean", image_mean, self.num_channels, must_be_positive=False)
        self.image_std = _band_values("image_std", image_std, self.num_channels, must_be_positive=True)
        super().__init__(id2label=id2label, label2id=label2id, **kwargs)

        # The label count is only known once the base class has settled id2label / num_labels.
        self.class_weights = _class_weights(class_weights, self.num_labels)
        if not _is_integer(self.ignore_index) or 0 <= self.ignore_index < self.num_labels:
            raise ValueError(
                "ignore_index must be an integer outside the class ids "
                f"0..{self.num_labels - 1}, such as 255; got {self.ignore_index!r}"
            )


def _timm_model_name(name):
    if not isinstance(name, str) or not timm.is_model(name):
        suggestions = difflib.get_close_matches(str(name), timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
        raise ValueError(f"backbone={name!r} is not a timm model name (see timm.list_models()){hint}")
    return name


def _is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(field, value):
    if not _is_integer(value) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


def _positive_int_list(field, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ValueError(f"{field} must be a non-empty list of positive integers, got {values!r}")
    for value in values:
        if not _is_integer(value) or value < 1:
            raise ValueError(f"{field} must be a non-empty list of positive integers, got {values!r}")
    return list(values)


def _band_values(field, values, num_channels, must_be_positive):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != num_channels:
        raise ValueError(
            f"{field} must have one value per input band (num_channels={num_channels}), got {values!r}"
        )
    for value in values:
        if (
            not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (must_be_positive and value <= 0)
        ):
            kind = "positive numbers" if must_be_positive else "finite numbers"
            raise ValueError(f"{field} must hold {kind} on the 0-255 scale, got {values!r}")
    return [float(value) for value in values]


def _class_weights(weights, num_labels):
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != num_labels:
        raise ValueError(
            f"class_weights must have one weight per label ({num_labels} labels), or be None for equal "
            f"weights; got {weights!r}"
        )
    for weight in weights:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"class_weights must be finite non-negative numbers, got {weights!r}")
    return [float(weight) for weight in weights]
