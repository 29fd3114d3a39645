"""Load Detectron2 DeepLabV3+ checkpoints (model-zoo pickles of numpy arrays) into the sidewalk model.

Pickles run code when loaded, so the file is read by an unpickler that rebuilds numpy arrays and plain
containers and refuses every other global before anything is called. Detectron2 names are mapped onto ours
(its DeepLab stem and res2..res5 onto timm's `resnet101s`, its DeepLabV3+ decoder onto `WeightedDeepLabHead`),
and loading is strict: the only tensors allowed to stay behind are the predictor's when the class counts
differ.
"""

import codecs
import collections
import importlib
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from . import save_pretrained_with_processor
from .configuration_sidewalk_deeplab import SidewalkDeepLabConfig
from .image_processing_sidewalk_deeplab import SidewalkImageProcessor
from .modeling_sidewalk_deeplab import SidewalkDeepLabForSemanticSegmentation

CITYSCAPES_ID2LABEL = dict(
    enumerate(
        [
            "road",
            "sidewalk",
            "building",
            "wall",
            "fence",
            "pole",
            "traffic light",
            "traffic sign",
            "vegetation",
            "terrain",
            "sky",
            "person",
            "rider",
            "car",
            "truck",
            "bus",
            "train",
            "motorcycle",
            "bicycle",
        ]
    )
)

PREDICTOR_KEYS = ("decode_head.classifier.weight", "decode_head.classifier.bias")


def _numpy_global(name: str):
    """A numpy internal that array pickles reference, from numpy 2's `_core` or numpy 1's `core` package."""
    module_name, attribute = name.rsplit(".", 1)
    try:
        module = importlib.import_module(f"numpy._core.{module_name}")
    except ImportError:
        module = importlib.import_module(f"numpy.core.{module_name}")
    return getattr(module, attribute)


# Everything a pickle of numpy arrays in dicts may reference, for numpy 1 and 2 and pickle protocols 0-5.
_ALLOWED_GLOBALS = {
    **{
        (f"numpy.{core}.{module}", attribute): _numpy_global(f"{module}.{attribute}")
        for core in ("core", "_core")
        for module, attribute in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # Protocol 0-2 pickles written by Python 3 store bytes (the array data) as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): codecs.encode,
}


class Detectron2CheckpointError(ValueError):
    """A checkpoint that is not a Detectron2 model-zoo pickle, or whose tensors do not fit the model."""


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint pickle referenced something other than numpy arrays and plain containers."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load {self.source}: it references the global '{module}.{name}', and only numpy "
                "arrays and plain containers are allowed (unpickling anything else can run code). "
                "Nothing was executed."
            ) from None

    def persistent_load(self, persistent_id):
        raise UnsafePickleError(
            f"refused to load {self.source}: it uses persistent ids, which numpy pickles never do"
        )


def read_detectron2_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a Detectron2 model-zoo pickle: `obj["model"]` (or `obj`), without `module.`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Detectron2 checkpoint {path!r} does not exist")
    with open(path, "rb") as file:
        try:
            checkpoint = _ArraysOnlyUnpickler(file, source=path).load()
        except UnsafePickleError:
            raise
        except Exception as error:
            raise Detectron2CheckpointError(
                f"{path!r} is not a Detectron2 model-zoo pickle: {error}"
            ) from error
    if not isinstance(checkpoint, dict):
        raise Detectron2CheckpointError(
            f"{path!r} holds a {type(checkpoint).__name__}, expected a dict of numpy arrays"
        )
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, dict):
        raise Detectron2CheckpointError(
            f"{path!r}: 'model' holds a {type(state_dict).__name__}, expected a dict of numpy arrays"
        )
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(value, np.ndarray):
            raise Detectron2CheckpointError(
                f"{path!r}: entry {name!r} is a {type(value).__name__}, expected a numpy array"
            )
        arrays[name.removeprefix("module.")] = value
    return arrays


def _stage(match: re.Match) -> str:
    """Detectron2's res2..res5 are timm's layer1..layer4."""
    return f"layer{int(match['stage']) - 1}"


_BACKBONE_BLOCK = r"backbone\.res(?P<stage>[2-5])\.(?P<block>\d+)"
_ASPP = r"sem_seg_head\.decoder\.res5\.project_conv"
_LOW_LEVEL = r"sem_seg_head\.decoder\.res2"

# (Detectron2 name pattern, our name built from the match), tried in order.
# `bn` is the name of a BatchNorm parameter or buffer.
_NAME_RULES = [
    (r"backbone\.stem\.conv1\.weight", lambda m: "backbone.conv1.0.weight"),
    (r"backbone\.stem\.conv1\.norm\.(?P<bn>\w+)", lambda m: f"backbone.conv1.1.{m['bn']}"),
    (r"backbone\.stem\.conv2\.weight", lambda m: "backbone.conv1.3.weight"),
    (r"backbone\.stem\.conv2\.norm\.(?P<bn>\w+)", lambda m: f"backbone.conv1.4.{m['bn']}"),
    (r"backbone\.stem\.conv3\.weight", lambda m: "backbone.conv1.6.weight"),
    (r"backbone\.stem\.conv3\.norm\.(?P<bn>\w+)", lambda m: f"backbone.bn1.{m['bn']}"),
    (
        _BACKBONE_BLOCK + r"\.conv(?P<conv>[1-3])\.weight",
        lambda m: f"backbone.{_stage(m)}.{m['block']}.conv{m['conv']}.weight",
    ),
    (
        _BACKBONE_BLOCK + r"\.conv(?P<conv>[1-3])\.norm\.(?P<bn>\w+)",
        lambda m: f"backbone.{_stage(m)}.{m['block']}.bn{m['conv']}.{m['bn']}",
    ),
    (
        _BACKBONE_BLOCK + r"\.shortcut\.weight",
        lambda m: f"backbone.{_stage(m)}.{m['block']}.downsample.0.weight",
    ),
    (
        _BACKBONE_BLOCK + r"\.shortcut\.norm\.(?P<bn>\w+)",
        lambda m: f"backbone.{_stage(m)}.{m['block']}.downsample.1.{m['bn']}",
    ),
    # ASPP: convs.0 is the 1x1 branch, convs.1..n the atrous ones, the last (pool, conv) the image pooling.
    (
        _ASPP + r"\.convs\.\d+\.1\.(?P<p>weight|bias)",
        lambda m: f"decode_head.aspp.image_pooling_conv.{m['p']}",
    ),
    (_ASPP + r"\.convs\.(?P<i>\d+)\.weight", lambda m: f"decode_head.aspp.branches.{m['i']}.conv.weight"),
    (
        _ASPP + r"\.convs\.(?P<i>\d+)\.norm\.(?P<bn>\w+)",
        lambda m: f"decode_head.aspp.branches.{m['i']}.norm.{m['bn']}",
    ),
    (_ASPP + r"\.project\.weight", lambda m: "decode_head.aspp.project.conv.weight"),
    (_ASPP + r"\.project\.norm\.(?P<bn>\w+)", lambda m: f"decode_head.aspp.project.norm.{m['bn']}"),
    (_LOW_LEVEL + r"\.project_conv\.weight", lambda m: "decode_head.low_level_projection.conv.weight"),
    (
        _LOW_LEVEL + r"\.project_conv\.norm\.(?P<bn>\w+)",
        lambda m: f"decode_head.low_level_projection.norm.{m['bn']}",
    ),
    (_LOW_LEVEL + r"\.fuse_conv\.(?P<j>\d+)\.weight", lambda m: f"decode_head.fuse.{m['j']}.conv.weight"),
    (
        _LOW_LEVEL + r"\.fuse_conv\.(?P<j>\d+)\.norm\.(?P<bn>\w+)",
        lambda m: f"decode_head.fuse.{m['j']}.norm.{m['bn']}",
    ),
    (r"sem_seg_head\.predictor\.(?P<p>weight|bias)", lambda m: f"decode_head.classifier.{m['p']}"),
]
_COMPILED_NAME_RULES = [(re.compile(pattern), target) for pattern, target in _NAME_RULES]


def detectron2_to_sidewalk_name(name: str) -> str | None:
    """Our state-dict key for a Detectron2 DeepLabV3+ R-103 key, or None if it has no counterpart."""
    for pattern, target in _COMPILED_NAME_RULES:
        match = pattern.fullmatch(name)
        if match:
            return target(match)
    return None


@dataclass
class ConversionReport:
    """What a Detectron2 checkpoint contributed to a model, for printing and for tests."""

    source: str
    loaded: dict[str, str] = field(default_factory=dict)
    """Our key -> the Detectron2 key it was loaded from."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Detectron2 key -> why it was not loaded."""
    left_at_init: dict[str, str] = field(default_factory=dict)
    """Our key -> why it keeps its initial value."""
    pixel_mean: list[float] | None = None
    pixel_std: list[float] | None = None

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} tensors from {self.source}."]
        lines.append(f"Left out {len(self.left_out)} checkpoint tensors:")
        lines += [f"  {name}: {reason}" for name, reason in self.left_out.items()]
        lines.append(f"Left {len(self.left_at_init)} model tensors at their initialisation:")
        lines += [f"  {name}: {reason}" for name, reason in self.left_at_init.items()]
        return "\n".join(lines)


def _normalisation_values(name: str, array: np.ndarray, num_channels: int, source: str) -> list[float]:
    if array.shape not in ((num_channels, 1, 1), (num_channels,)):
        raise Detectron2CheckpointError(
            f"{source}: {name} has shape {array.shape}, expected ({num_channels}, 1, 1)"
        )
    # The shortest decimals that round-trip in the array's dtype: 123.675, not float32's 123.67500305175781.
    return [float(np.format_float_positional(value)) for value in array.reshape(-1)]


def load_detectron2_state_dict(
    model: SidewalkDeepLabForSemanticSegmentation,
    state_dict: dict[str, np.ndarray],
    source: str = "checkpoint",
) -> ConversionReport:
    """Copy a Detectron2 DeepLabV3+ state dict into `model`, strictly.

    Every model tensor must come from the checkpoint with the same shape, and every checkpoint tensor must
    land in the model, except: the predictor when its class count differs from the model's (it keeps its
    initialisation), `pixel_mean`/`pixel_std` (normalisation is the image processor's; their values are
    reported), and `num_batches_tracked` counters absent from older files. Anything else raises a
    `Detectron2CheckpointError` that lists the offending names, and the model is left untouched.
    """
    report = ConversionReport(source=source)
    num_channels = model.config.num_channels
    model_state = model.state_dict()
    tensors, unknown, mismatched = {}, [], []
    for name, array in state_dict.items():
        if name in ("pixel_mean", "pixel_std"):
            values = _normalisation_values(name, array, num_channels, source)
            setattr(report, name, values)
            report.left_out[name] = f"input normalisation belongs to the image processor; values {values}"
            continue
        target = detectron2_to_sidewalk_name(name)
        if target is None or target not in model_state:
            unknown.append(name if target is None else f"{name} (-> {target})")
            continue
        expected_shape = tuple(model_state[target].shape)
        if tuple(array.shape) != expected_shape:
            if target in PREDICTOR_KEYS:
                report.left_out[name] = (
                    f"the checkpoint predicts {array.shape[0]} classes, the model {model.config.num_labels}"
                )
                report.left_at_init[target] = "class count differs from the checkpoint's"
                continue
            mismatched.append(f"{name} {tuple(array.shape)} -> {target} {expected_shape}")
            continue
        tensors[target] = torch.from_numpy(np.array(array, copy=True))
        report.loaded[target] = name

    missing = [key for key in model_state if key not in tensors and key not in report.left_at_init]
    for key in [key for key in missing if key.endswith(".num_batches_tracked")]:
        report.left_at_init[key] = "absent from the checkpoint (only used when BatchNorm momentum is None)"
        missing.remove(key)
    problems = []
    for title, names in (
        ("checkpoint tensors with no place in the model", unknown),
        ("shape mismatches", mismatched),
        ("model tensors missing from the checkpoint", missing),
    ):
        if names:
            shown = "\n  ".join(names[:20]) + (
                f"\n  ... and {len(names) - 20} more" if len(names) > 20 else ""
            )
            problems.append(f"{len(names)} {title}:\n  {shown}")
    if problems:
        raise Detectron2CheckpointError(
            f"{source} does not fit this model (backbone {model.config.backbone!r}, "
            f"{model.config.num_labels} labels); Detectron2 DeepLabV3+ R-103 checkpoints need backbone "
            "'resnet101s' with the default decoder sizes.\n" + "\n".join(problems)
        )

    config = model.config
    for name, model_values in (("pixel_mean", config.image_mean), ("pixel_std", config.image_std)):
        checkpoint_values = getattr(report, name)
        if checkpoint_values is not None and not np.allclose(checkpoint_values, model_values):
            report.left_out[name] += f" (the model's image processor uses {model_values})"
    model.load_state_dict(tensors, strict=False)
    return report


def load_detectron2_weights(
    model: SidewalkDeepLabForSemanticSegmentation, checkpoint_path: str | os.PathLike
) -> ConversionReport:
    """Initialise `model` from a Detectron2 DeepLabV3+ model-zoo pickle (training's `--weights_path`).

    Raises `FileNotFoundError` for a missing file, `UnsafePickleError` for a pickle that references anything
    but numpy arrays, and `Detectron2CheckpointError` (a `ValueError`) when the file is not a model-zoo pickle
    or its names or shapes do not fit the model.
    """
    state_dict = read_detectron2_checkpoint(checkpoint_path)
    return load_detectron2_state_dict(model, state_dict, source=os.fspath(checkpoint_path))


def convert_detectron2_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_labels: int = 2,
    backbone: str = "resnet101s",
) -> ConversionReport:
    """Write a `save_pretrained` folder (weights, config, processor, model code) from a Detectron2 pickle.

    With 2 labels the config is the sidewalk default (background / sidewalk, class weights [1, 10]) and the
    19-class Cityscapes predictor is dropped; with 19 the Cityscapes names are kept; other counts get generic
    names. The image processor normalises with the checkpoint's `pixel_mean`/`pixel_std` when the file has
    them.
    """
    state_dict = read_detectron2_checkpoint(checkpoint_path)
    config_kwargs = {"backbone": backbone}
    if num_labels == len(CITYSCAPES_ID2LABEL):
        config_kwargs.update(id2label=CITYSCAPES_ID2LABEL, class_weights=None)
    elif num_labels != 2:
        config_kwargs.update(num_labels=num_labels, class_weights=None)
    for name, field_name in (("pixel_mean", "image_mean"), ("pixel_std", "image_std")):
        if name in state_dict:
            config_kwargs[field_name] = _normalisation_values(
                name, state_dict[name], 3, os.fspath(checkpoint_path)
            )
    config = SidewalkDeepLabConfig(**config_kwargs)
    model = SidewalkDeepLabForSemanticSegmentation(config).eval()
    report = load_detectron2_state_dict(model, state_dict, source=os.fspath(checkpoint_path))
    save_pretrained_with_processor(model, SidewalkImageProcessor.from_model_config(config), output_dir)
    return report
