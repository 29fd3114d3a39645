"""Sidewalk segmentation from aerial image chips: DeepLabV3+ as a transformers model.

Importing the package registers the model with transformers' Auto classes (so `AutoModel.from_pretrained` on a
saved folder uses this code without `trust_remote_code`) and marks the classes for export as remote code (so
`save_pretrained` writes the model files and `auto_map` beside the weights, for loading where this package is
not installed).
"""

import os

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
)

from .configuration_sidewalk_deeplab import SidewalkDeepLabConfig
from .image_processing_sidewalk_deeplab import SidewalkImageProcessor
from .modeling_sidewalk_deeplab import (
    ASPP,
    SidewalkDeepLabForSemanticSegmentation,
    WeightedDeepLabHead,
    convert_batchnorm_to_sync,
    hard_pixel_mining_cross_entropy,
)

__all__ = [
    "ASPP",
    "SidewalkDeepLabConfig",
    "SidewalkDeepLabForSemanticSegmentation",
    "SidewalkImageProcessor",
    "WeightedDeepLabHead",
    "convert_batchnorm_to_sync",
    "hard_pixel_mining_cross_entropy",
    "save_pretrained_with_processor",
]

AutoConfig.register(SidewalkDeepLabConfig.model_type, SidewalkDeepLabConfig, exist_ok=True)
AutoModel.register(SidewalkDeepLabConfig, SidewalkDeepLabForSemanticSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(
    SidewalkDeepLabConfig, SidewalkDeepLabForSemanticSegmentation, exist_ok=True
)
AutoImageProcessor.register(
    SidewalkDeepLabConfig, image_processor_classes={"torchvision": SidewalkImageProcessor}, exist_ok=True
)

SidewalkDeepLabConfig.register_for_auto_class()
SidewalkDeepLabForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
SidewalkImageProcessor.register_for_auto_class("AutoImageProcessor")


def save_pretrained_with_processor(
    model: SidewalkDeepLabForSemanticSegmentation,
    processor: SidewalkImageProcessor,
    save_directory: str | os.PathLike,
) -> None:
    """Write a folder that `from_pretrained` and `pipeline("image-segmentation")` load, here or on the Hub.

    It holds `config.json`, `model.safetensors`, `preprocessor_config.json` and the model's Python files, with
    `auto_map` entries for `AutoConfig`, `AutoModel`, `AutoModelForSemanticSegmentation` and
    `AutoImageProcessor`.
    """
    model.save_pretrained(save_directory)
    processor.save_pretrained(save_directory)
