"""The model's classes in transformers' Auto classes and marked for export, as soon as their module is imported.

``AutoConfig``, ``AutoModel``, ``AutoModelForSemanticSegmentation`` and ``AutoImageProcessor`` learn the
sidewalk classes (so ``from_pretrained`` on a saved folder uses this package's code without
``trust_remote_code``), and ``register_for_auto_class`` marks them for export (so ``save_pretrained`` writes
the model's Python files and ``auto_map`` beside the weights, for loading where this package is not
installed). The package imports the model lazily, so these steps cannot run when it is imported: each runs
right after its module is, whatever the import path (``from sidewalk_hf import SidewalkDeepLabConfig``, or
``from sidewalk_hf.modeling_sidewalk_deeplab import ...`` as training does). The model files themselves stay
free of this package: they are the remote code a saved folder ships.
"""

from __future__ import annotations

import importlib
import sys
import types


def _register_config(module: types.ModuleType) -> None:
    from transformers import AutoConfig

    config_class = module.SidewalkDeepLabConfig
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()


def _register_model(module: types.ModuleType) -> None:
    from transformers import AutoModel, AutoModelForSemanticSegmentation

    from .configuration_sidewalk_deeplab import SidewalkDeepLabConfig

    model_class = module.SidewalkDeepLabForSemanticSegmentation
    AutoModel.register(SidewalkDeepLabConfig, model_class, exist_ok=True)
    AutoModelForSemanticSegmentation.register(SidewalkDeepLabConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class("AutoModelForSemanticSegmentation")


def _register_image_processor(module: types.ModuleType) -> None:
    from transformers import AutoImageProcessor

    from .configuration_sidewalk_deeplab import SidewalkDeepLabConfig

    processor_class = module.SidewalkImageProcessor
    AutoImageProcessor.register(
        SidewalkDeepLabConfig, image_processor_classes={"torchvision": processor_class}, exist_ok=True
    )
    processor_class.register_for_auto_class("AutoImageProcessor")


REGISTER_AFTER_IMPORT = {
    "configuration_sidewalk_deeplab": _register_config,
    "modeling_sidewalk_deeplab": _register_model,
    "image_processing_sidewalk_deeplab": _register_image_processor,
}
_imported: set[str] = set()
_registered: set[str] = set()


def model_module_imported(package: str, name: str) -> None:
    """``package.name``, one of the model's modules, has been imported: register every class whose module is
    imported, and import the others (each registers when it is), as importing the package did before it
    became lazy. A module that is being imported right now (it imports this one) registers when it is done.
    """
    _imported.add(name)
    for module_name, register in REGISTER_AFTER_IMPORT.items():
        full_name = f"{package}.{module_name}"
        if module_name in _registered:
            continue
        if module_name in _imported:
            _registered.add(module_name)
            register(sys.modules[full_name])
        elif full_name not in sys.modules:
            importlib.import_module(full_name)


class ModelRegisteringPackage(types.ModuleType):
    """The package's module type: the import system binds every submodule it has loaded on its package with
    ``setattr`` (a documented step of importing), which is where the model's registration runs."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in REGISTER_AFTER_IMPORT and getattr(value, "__name__", None) == f"{self.__name__}.{name}":
            model_module_imported(self.__name__, name)
