"""Training configuration: Detectron2-style upper-case dotted keys, validated by an OmegaConf schema.

The schema below is the single list of keys that exist. A YAML file may name a parent with ``_BASE_``
(resolved relative to the file, child overrides parent, as in Detectron2); ``--opts KEY VALUE`` pairs
override any key. Unknown keys and values of the wrong type fail before anything starts, with the key
and the closest valid key in the message.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# The YAML files ship inside the package (a wheel install has them); the repository's top-level configs/ is a
# link to this folder.
CONFIGS_DIR = Path(str(resources.files("sidewalk_hf") / "configs"))


@dataclass
class LossConfig:
    CLASS_WEIGHTS: list[float] = field(default_factory=lambda: [1.0, 10.0])
    TOP_K_PERCENT_PIXELS: float = 1.0


@dataclass
class ModelConfig:
    BACKBONE: str = "resnet101s"
    OUTPUT_STRIDE: int = 16
    RES5_MULTI_GRID: list[int] = field(default_factory=lambda: [1, 2, 4])
    ASPP_DILATIONS: list[int] = field(default_factory=lambda: [6, 12, 18])
    ASPP_CHANNELS: int = 256
    ASPP_DROPOUT: float = 0.1
    PROJECT_CHANNELS: int = 48
    DECODER_CHANNELS: int = 256
    LABELS: list[str] = field(default_factory=lambda: ["background", "sidewalk"])
    IGNORE_VALUE: int = 255
    # Initial weights: a Detectron2 model-zoo .pkl or a save_pretrained folder; "" trains from scratch.
    WEIGHTS: str = ""
    # BatchNorm -> SyncBatchNorm when training on more than one GPU (never on CPU processes).
    SYNC_BATCHNORM: bool = True
    LOSS: LossConfig = field(default_factory=LossConfig)


@dataclass
class InputConfig:
    NUM_CHANNELS: int = 3
    # Per-band mean/std on the 0-255 scale; written into the image processor, the one normalisation source.
    PIXEL_MEAN: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    PIXEL_STD: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    CROP_SIZE_PX: int = 256
    SCALE_RANGE: list[float] = field(default_factory=lambda: [0.75, 1.5])


@dataclass
class SyntheticConfig:
    """Used only when DATASET.SOURCE is the generated synthetic dataset and it does not exist yet."""

    GENERATE_IF_MISSING: bool = True
    NUM_TRAIN: int = 2000
    NUM_VALIDATION: int = 200
    NUM_TEST: int = 200
    CHIP_SIZE_PX: int = 256
    NUM_SHARDS: int = 8
    SEED: int = 0


@dataclass
class DatasetConfig:
    # A local folder in the Hub layout or a Hub dataset id ("org/name").
    SOURCE: str = "data/synthetic"
    TRAIN_SPLIT: str = "train"
    VALIDATION_SPLIT: str = "validation"
    # "" skips the final test evaluation.
    TEST_SPLIT: str = "test"
    # "skip": bad samples are counted and reported in the run folder; "error": the first one stops the run.
    ON_BAD_SAMPLE: str = "skip"
    SYNTHETIC: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataLoaderConfig:
    # GLOBAL batch: per-process batch = BATCH_SIZE / (processes x gradient-accumulation steps).
    BATCH_SIZE: int = 48
    BUFFER_BATCHES: int = 64
    NUM_WORKERS: int = 4
    EVAL_BATCH_SIZE: int = 8


@dataclass
class SolverConfig:
    MAX_ITER: int = 100_000
    BASE_LR: float = 1e-3
    FINAL_LR: float = 1e-4
    WARMUP_ITERS: int = 1000
    WARMUP_FACTOR: float = 1e-3
    MOMENTUM: float = 0.9
    NESTEROV: bool = False
    WEIGHT_DECAY: float = 1e-4
    WEIGHT_DECAY_NORM: float = 0.0
    # None: biases decay like other weights (Detectron2's default).
    WEIGHT_DECAY_BIAS: Optional[float] = None  # noqa: UP045 (OmegaConf schemas want Optional)
    CLIP_GRAD_NORM: float = 1.0
    # None: what the launcher says (DeepSpeed's `--gradient_accumulation_steps`, else 1).
    GRADIENT_ACCUMULATION_STEPS: Optional[int] = None  # noqa: UP045 (OmegaConf schemas want Optional)
    # "no" or "bf16" (or "fp16" on GPUs); None: what the launcher says (`accelerate launch --mixed_precision`
    # or `accelerate config`, else "no"). A value here that contradicts the launcher is an error.
    MIXED_PRECISION: Optional[str] = None  # noqa: UP045 (OmegaConf schemas want Optional)
    # Channels-last activations and weights: 1.04-1.14x faster training steps on CPUs (oneDNN), the layout
    # GPU convolutions prefer; false keeps PyTorch's default NCHW.
    CHANNELS_LAST: bool = True
    # "stop": a non-finite loss ends the run naming the iteration; "skip": that step is skipped.
    ON_NONFINITE_LOSS: str = "stop"


@dataclass
class TestConfig:
    EVAL_PERIOD: int = 5000
    NUM_PICTURES: int = 4


@dataclass
class CheckpointConfig:
    PERIOD: int = 5000
    KEEP_LAST: int = 3


@dataclass
class OutputConfig:
    ROOT: str = "runs"
    NAME: str = "sidewalk-deeplab"
    LOG_PERIOD: int = 20


@dataclass
class TrackingConfig:
    """Experiment trackers, on top of the run folder's metrics.jsonl, which is always written."""

    # Any of Accelerate's trackers: tensorboard, wandb, mlflow, clearml, trackio, aim, comet_ml, dvclive.
    LOG_WITH: list[str] = field(default_factory=lambda: ["tensorboard"])
    # The tracker's project (wandb, trackio, comet_ml, clearml) or experiment (mlflow); runs are named after
    # their run folder.
    PROJECT: str = "sidewalk-hf"
    # Keyword arguments for each tracker's init, e.g. {wandb: {entity: my-team, tags: [r101]}}.
    INIT_KWARGS: dict[str, Any] = field(default_factory=dict)


@dataclass
class HubConfig:
    PUSH_AT_END: bool = False
    REPO_ID: str = ""
    PRIVATE: bool = True


@dataclass
class InferenceConfig:
    """``scripts/predict.py``: sliding-window prediction of rasters (flags of the same name override these)."""

    # 0: the model's training chip size (the ASPP's image pooling makes predictions depend on it).
    WINDOW_PX: int = 0
    STRIDE_FRACTION: float = 0.75
    # Weight of a window's logits across it: "cosine" (raised cosine), "gaussian", or "none" (flat).
    BLEND: str = "cosine"
    BATCH_SIZE: int = 8
    # -1: none on a CPU (a reading worker takes a core from the model: 0.80x end to end with one on 2 cores),
    # min(4, half the cores) on a GPU.
    NUM_WORKERS: int = -1
    # "fp32" or "bf16" (autocast; CPUs with native bfloat16 and GPUs).
    DTYPE: str = "fp32"
    # Fold batch norms into convolutions before running (same class maps, less work).
    OPTIMIZE: bool = True
    # 1-based bands, e.g. "4,2,3"; "" = every non-alpha band (or the rule the model was trained with).
    BANDS: str = ""
    # "" = the model's rule, else none (uint8); "fixed:LO,HI[;LO,HI...]" or "percentiles:P,Q".
    SCALE: str = ""
    WRITE_PROBS: bool = False
    # Run the sidewalk-network stage on every mask at the end.
    VECTORS: bool = True
    # "local" (this process, or each process of `accelerate launch`) or "ray".
    ENGINE: str = "local"
    RAY_ADDRESS: str = ""
    # 0: one actor per GPU, else one per two CPUs.
    RAY_NUM_ACTORS: int = 0


@dataclass
class VectorConfig:
    """The sidewalk network stage (``scripts/vectorize.py``, end of ``predict.py``); lengths in metres on
    the ground, whatever the raster's CRS unit."""

    MIN_OBJECT_AREA_M2: float = 4.0
    MIN_HOLE_AREA_M2: float = 4.0
    SPUR_LENGTH_M: float = 3.0
    GAP_LENGTH_M: float = 6.0
    # A gap is joined only towards points within this angle of the end's direction.
    JOIN_MAX_ANGLE_DEG: float = 45.0
    # ... and only where the network's own path between the two is longer than this many times the gap
    # (another component: no path at all).
    JOIN_DETOUR_FACTOR: float = 4.0
    # After joining, a connected piece shorter than this in all (and not leaving the tile) is dropped.
    MIN_COMPONENT_LENGTH_M: float = 10.0
    SIMPLIFY_TOLERANCE_M: float = 0.25
    # Blocks of this side (clamped to 256-4096 px) read with a halo wider than any sidewalk.
    BLOCK_SIZE_M: float = 512.0
    HALO_M: float = 32.0
    # Probability rasters: sidewalk where probability >= THRESHOLD.
    THRESHOLD: float = 0.5
    # Processes over tiles (several inputs); 1 = this process.
    WORKERS: int = 1
    # "local" (this process, or WORKERS processes) or "ray" (a task per tile on a Ray cluster).
    ENGINE: str = "local"
    RAY_ADDRESS: str = ""
    # scripts/score_network.py: buffer widths, APLS control-point spacing and snapping, junction matching.
    SCORE_BUFFERS_M: list[float] = field(default_factory=lambda: [1.0, 2.0])
    APLS_CONTROL_SPACING_M: float = 5.0
    APLS_SNAP_M: float = 2.0
    JUNCTION_RADIUS_M: float = 3.0


@dataclass
class DatasetBuildConfig:
    """``scripts/make_dataset.py``: a training dataset from orthophotos and sidewalk vectors (flags override)."""

    # Rasters (files, folders, globs) and vector files (GeoJSON, GeoPackage, Shapefile; any CRS).
    IMAGES: list[str] = field(default_factory=list)
    LABELS: list[str] = field(default_factory=list)
    # An OGR SQL filter for the label files, e.g. "footway = 'sidewalk'"; "" keeps every feature.
    LABELS_WHERE: str = ""
    # Line width attribute (metres, "1.8", "1.8 m", "6 ft"); LINE_WIDTH_M for lines without one.
    WIDTH_FIELD: str = "width"
    LINE_WIDTH_M: Optional[float] = None  # noqa: UP045 (OmegaConf schemas want Optional)
    # Polygons of the annotated area (outside: 255); "" = the convex hull of each label file.
    LABEL_REGION: str = ""
    OUT: str = ""
    CHIP_SIZE_PX: int = 256
    OVERLAP_PX: int = 32
    # The pixel rule shared with inference: 1-based bands ("" = every non-alpha band) and scaling.
    BANDS: str = ""
    SCALE: str = "none"
    IMAGE_FORMAT: str = "png"
    # Fractions of train, validation, test; whole spatial blocks (or whole rasters) per split.
    SPLIT: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    SPLIT_BY: str = "block"
    SPLIT_BLOCK_M: float = 500.0
    SEED: int = 0
    # Hub license id of the dataset; the labels' source and license ("" = ODbL when they look like OSM).
    LICENSE: str = "other"
    LABEL_SOURCE: str = ""
    LABEL_LICENSE: str = ""
    PRETTY_NAME: str = ""
    # Worker processes cutting chips (0: in the main process).
    NUM_WORKERS: int = 4
    # "org/name" publishes the finished dataset.
    PUSH_TO_HUB: str = ""
    PRIVATE: bool = True


@dataclass
class TrainingConfig:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    INPUT: InputConfig = field(default_factory=InputConfig)
    DATASET: DatasetConfig = field(default_factory=DatasetConfig)
    DATALOADER: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    SOLVER: SolverConfig = field(default_factory=SolverConfig)
    TEST: TestConfig = field(default_factory=TestConfig)
    CHECKPOINT: CheckpointConfig = field(default_factory=CheckpointConfig)
    OUTPUT: OutputConfig = field(default_factory=OutputConfig)
    TRACKING: TrackingConfig = field(default_factory=TrackingConfig)
    HUB: HubConfig = field(default_factory=HubConfig)
    INFERENCE: InferenceConfig = field(default_factory=InferenceConfig)
    DATASET_BUILD: DatasetBuildConfig = field(default_factory=DatasetBuildConfig)
    VECTOR: VectorConfig = field(default_factory=VectorConfig)
    SEED: int = 0


CHOICES = {
    "DATASET.ON_BAD_SAMPLE": ("skip", "error"),
    "SOLVER.MIXED_PRECISION": ("no", "bf16", "fp16", None),
    "SOLVER.ON_NONFINITE_LOSS": ("stop", "skip"),
    "INFERENCE.BLEND": ("cosine", "gaussian", "none"),
    "INFERENCE.DTYPE": ("fp32", "bf16"),
    "INFERENCE.ENGINE": ("local", "ray"),
    "VECTOR.ENGINE": ("local", "ray"),
    "DATASET_BUILD.SPLIT_BY": ("block", "raster"),
    "DATASET_BUILD.IMAGE_FORMAT": ("png", "jpeg"),
}


# Keys below these hold free-form mappings (any key may be set under them).
FREE_FORM_KEYS = ("TRACKING.INIT_KWARGS",)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


def all_keys() -> list[str]:
    """Every valid dotted key of the schema."""

    def walk(node: DictConfig, prefix: str) -> list[str]:
        keys = []
        for key in node:
            value = node._get_node(key)
            if isinstance(value, DictConfig):
                keys += walk(value, f"{prefix}{key}.")
            else:
                keys.append(f"{prefix}{key}")
        return keys

    return walk(OmegaConf.structured(TrainingConfig), "")


def _closest_key(key: str) -> str:
    matches = difflib.get_close_matches(key.upper(), all_keys(), n=1, cutoff=0.4)
    return f" (closest valid key: {matches[0]})" if matches else ""


def _merge(base: DictConfig, override: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, override)
    except ConfigKeyError as error:
        key = error.full_key or str(error.key)
        raise ConfigError(f"{source}: unknown key {key!r}{_closest_key(key)}") from None
    except ValidationError as error:
        raise ConfigError(
            f"{source}: bad value for {error.full_key!r}: {str(error.msg).splitlines()[0]}"
        ) from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {error}") from None


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path that exists wins; otherwise a bare name is looked up in ``configs/`` (".yaml" optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / path.name, CONFIGS_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} not found as a path nor in {CONFIGS_DIR} ({available})")


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The chain of YAML documents, most basic first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _BASE_ cycle through {[str(p) for p in seen]}")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(document).__name__}")
    base = document.pop("_BASE_", None)
    chain = []
    if base:
        chain = _read_yaml_with_bases((path.parent / base), seen + (path,))
    return chain + [(path, document)]


def _parse_opts(opts: list[str]) -> list[tuple[str, Any]]:
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}")
    pairs = []
    for key, raw in zip(opts[::2], opts[1::2]):
        if key == "_BASE_":
            raise ConfigError("--opts: _BASE_ cannot be set on the command line")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, str) and value is not None and _is_string_key(key):
            value = raw  # `--opts SOLVER.MIXED_PRECISION no`: YAML would read the word as False
        pairs.append((key, value))
    return pairs


def _is_string_key(key: str) -> bool:
    node: Any = OmegaConf.structured(TrainingConfig)
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return node._metadata.ref_type is str


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} is {value!r}; valid values are {list(allowed)}")


def load_config(config: str | Path | None = None, opts: list[str] | None = None) -> DictConfig:
    """Schema defaults, then the YAML chain, then the ``KEY VALUE`` overrides; validated and read-only."""
    cfg = OmegaConf.structured(TrainingConfig)
    if config is not None:
        for path, document in _read_yaml_with_bases(resolve_config_path(config)):
            cfg = _merge(cfg, document, str(path))
    for key, value in _parse_opts(list(opts or [])):
        if key not in all_keys() and not key.startswith(tuple(f"{k}." for k in FREE_FORM_KEYS)):
            raise ConfigError(f"--opts: unknown key {key!r}{_closest_key(key)}")
        cfg = _merge(cfg, _dotted(key, value), f"--opts {key}")
    _check_choices(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def flag_overrides(args, flag_keys: dict[str, str]) -> list[str]:
    """``KEY VALUE`` pairs for the dedicated command-line flags that were given (``flag -> config key``)."""
    overrides: list[str] = []
    for flag, key in flag_keys.items():
        value = getattr(args, flag)
        if value is not None:
            overrides += [key, str(value)]
    return overrides


def _dotted(key: str, value: Any) -> dict:
    nested: dict = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_flat_dict(cfg: DictConfig) -> dict[str, Any]:
    """``{"SOLVER.BASE_LR": 0.001, ...}`` with lists as strings, for trackers that take scalars only."""
    flat = {}
    for key in all_keys():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            value = str(list(value))
        elif value is None:
            value = "None"
        flat[key] = value
    return flat
