"""Sidewalk segmentation from aerial image chips: DeepLabV3+ as a transformers model.

The model, its image processor and its layers are imported on first use (``from sidewalk_hf import
SidewalkDeepLabConfig``), so that ``import sidewalk_hf`` and the parts that need no model (the vector stage,
the geodata tools, the configuration) never import torch or transformers. Importing a model class registers
it with transformers' Auto classes (so ``AutoModel.from_pretrained`` on a saved folder uses this code without
``trust_remote_code``) and marks it for export as remote code (so ``save_pretrained`` writes the model files
and ``auto_map`` beside the weights, for loading where this package is not installed): see
``auto_classes.py``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .auto_classes import REGISTER_AFTER_IMPORT, ModelRegisteringPackage, model_module_imported
from .lazy_exports import lazy_exports

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ASPP": ".modeling_sidewalk_deeplab",
        "SidewalkDeepLabConfig": ".configuration_sidewalk_deeplab",
        "SidewalkDeepLabForSemanticSegmentation": ".modeling_sidewalk_deeplab",
        "SidewalkImageProcessor": ".image_processing_sidewalk_deeplab",
        "WeightedDeepLabHead": ".modeling_sidewalk_deeplab",
        "convert_batchnorm_to_sync": ".modeling_sidewalk_deeplab",
        "hard_pixel_mining_cross_entropy": ".modeling_sidewalk_deeplab",
    },
)

sys.modules[__name__].__class__ = ModelRegisteringPackage
for _name in REGISTER_AFTER_IMPORT:  # already imported: the package is being reloaded
    if f"{__name__}.{_name}" in sys.modules:
        model_module_imported(__name__, _name)


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
